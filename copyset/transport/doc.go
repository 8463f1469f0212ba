// Package transport carries Raft messages between chunkservers.
//
// A chunkserver hosts hundreds of copysets and shares most of them with the
// same few peers, so messages are not sent per copyset: each chunkserver
// keeps two outgoing wire connections (package internal/wire) per peer
// chunkserver, one for appends and one for everything else (lanes); the
// goroutine of each lane drains a queue of the messages of every copyset
// bound for that peer into a single RaftBatch, a one-way wire message
// written straight to the socket. The receiving connection's reader hands
// each message to its copyset without another goroutine. Heartbeats (MsgHeartbeat and MsgHeartbeatResp),
// which dominate the traffic of idle copysets, travel in the batch as a
// compact coalesced list rather than as full Raft messages. The queue is
// swapped out under its lock and the batch is encoded and sent after the lock
// is released, so a slow peer never blocks the Raft workers. A batch holds
// the Raft messages themselves: each is encoded once, with the batch,
// straight into the connection's write buffer, and decoded once, with the
// batch, on the receiving side.
//
// Messages are best effort, as Raft expects: a full queue or a broken connection
// drops messages and reports the peer unreachable; Raft retries.
//
// Snapshots travel on a separate gRPC client stream per transfer
// (InstallSnapshot) so that copying chunk files never delays heartbeats.
//
// Peer addresses are not part of Raft: a Resolver maps a chunkserver id to
// its current address (the chunkserver asks the MDS topology).
//
// Network and Memory carry the same traffic in memory between engines of
// one process, for tests that must not depend on sockets or connection
// goroutines (with manual ticks, copyset tests then move only when the
// test says).
//
// Faults is a fault-injection seam for tests: it drops, delays, duplicates
// and reorders messages and partitions pairs of chunkservers, seeded and
// repeatable.
package transport
