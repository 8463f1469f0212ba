// Package copyset runs the Raft groups (copysets) of one chunkserver.
//
// A copyset is a group of three replicas, one per failure zone, that keeps a
// set of chunks identical on each of them. Its state machine is the chunk
// files of those chunks (a ChunkStore, implemented by chunkserver/datastore);
// its log is go.etcd.io/raft/v3 driven as a RawNode. A chunkserver hosts
// hundreds of copysets; the Engine runs all of them.
//
// # Workers, not goroutines per group
//
// No copyset owns a goroutine. Work for a copyset (a Raft message, a tick, a
// proposal, a finished WAL write, a call that needs the RawNode) is put in its
// inbox and the copyset is queued once on the Raft work queue; one of a fixed
// pool of Raft workers drains the inbox and handles the Ready states it
// produces. Committed entries go to a second queue drained by a fixed pool of
// apply workers, one copyset at a time, so different copysets apply in
// parallel while each applies in log order (scheduler.go). A chunkserver with
// a thousand copysets runs as many goroutines as one with ten.
//
// # The write path
//
// A write is proposed on the leader (propose.go). Raft runs with
// AsyncStorageWrites: each Ready's new entries and hard state become a
// MsgStorageAppend that is submitted to the chunkserver's shared write-ahead
// log (package copyset/wal), which makes the submissions of every copyset
// durable with one fdatasync (group commit). The worker does not wait: the
// leader sends MsgApp to its followers while its own fdatasync runs, and
// Raft's acknowledgements (a follower's MsgAppResp, a vote) are held until
// the WAL reports them durable (raft.go). Once an entry is committed it is
// applied to the chunk files with pwrite and no fsync (apply.go), and the
// waiting proposal is answered: the write is durable on a quorum.
//
// # Checkpoints
//
// After CheckpointBytes of applied commands, every CheckpointInterval, or when
// the WAL asks (too many segments held), a copyset fdatasyncs its chunk files
// and then writes its meta file raft.meta (applied index and term,
// configuration, configuration epoch, durable hard state) with temp + fsync +
// rename + fsync(dir) (checkpoint.go, meta.go). Only then may the WAL drop
// the copyset's records at or below the applied index and the in-memory log
// be trimmed. Recovery (copyset.go, open) starts from raft.meta and replays
// the WAL records after it.
//
// # Snapshots copy nothing when taken
//
// A Raft snapshot is the checkpoint's index, term and configuration. When a
// follower needs one, the leader streams its live chunk files to it
// (snapshot.go). Chunk writes are overwrites of byte ranges and a delete is
// an overwrite with zeros, so a replica whose every byte holds the value of
// some applied state at or after index a converges once it applies the log
// from a; newer data in the copied files is harmless and an interrupted
// install is repaired by replaying the log.
//
// # Reads
//
// Reads are served by the leader only, from the chunk files, once its
// leadership is confirmed by a ReadIndex round or by a lease counted from
// when a confirmed round was issued, and everything committed before the read
// is applied (read.go). Followers never serve client reads.
//
// # Membership
//
// Add, promote and remove are ConfChangeV2 entries checked against the
// copyset's configuration epoch, the log index of its last applied membership
// change (membership.go); leadership transfer uses Raft's. Raft node ids are
// chunkserver ids; addresses are resolved outside Raft (package
// copyset/transport carries the messages).
//
// docs/copyset.md describes the design with measurements.
package copyset
