// Package chunkserver is the chunkserver daemon's core: it hosts a
// chunkserver's copysets and serves them over gRPC and the wire protocol.
//
// A chunkserver owns one data directory (one disk in production):
//
//	<data>/identity.json   chunkserver id and token from the MDS, and the
//	                       zone/host/pool it registered with
//	<data>/epochs.json     the volume epoch table (fencing)
//	<data>/chunkfilepool/  the preformatted chunk file pool
//	<data>/engine/         the copyset engine: shared WAL, copysets, trash
//
// On start it opens the chunk file pool (geometry from its flags, or asked
// from the MDS on first start), registers with the MDS (re-using its
// persisted identity), opens the copyset engine (package copyset), and serves
// on one address: ChunkService for clients (its IO calls, WriteChunk,
// ReadChunk and DeleteChunk, on the wire protocol of package internal/wire;
// all of it on gRPC), CopysetService for the MDS and tools (gRPC), and the
// Raft transport for its peers (Raft batches on wire, snapshots on gRPC).
// The first bytes of a connection choose its protocol (wire.Split).
// It heartbeats to the MDS every few seconds with its capacity and the status
// of every copyset it hosts, and carries out the operators the MDS returns
// (transfer leader, add or remove a replica) when their configuration epoch
// still matches.
//
// Every chunk request is checked before it reaches Raft: a missing or
// unknown copyset, alignment and bounds (INVALID_REQUEST), the volume epoch
// (EPOCH_TOO_OLD), leadership (REDIRECTED with the leader's id and address),
// space (NOSPACE) and a cap on requests in flight (OVERLOAD, answered at
// once). The epoch check and the proposal happen under one lock that
// UpdateEpoch takes exclusively, so a fenced write is ordered before every
// write of the new opener or not written at all. A request carrying a newer
// epoch than the table raises the table first.
//
// The epoch table is trusted only under the epoch lease of the MDS: every
// heartbeat answer grants it until the heartbeat's send time plus the length
// the answer names (monotonic clock). Without a valid lease, after a start
// or when heartbeats have not got through for that long, writes, deletes and
// epoch-checked reads are refused with UNAVAILABLE, which clients retry. The
// MDS lets a new writer in only once every chunkserver it could not push the
// new epoch to has lost its lease (epochs.go, docs/architecture.md).
package chunkserver
