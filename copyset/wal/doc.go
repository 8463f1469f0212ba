// Package wal is the write-ahead log a chunkserver shares among all the
// copysets (Raft groups) it hosts.
//
// Every Raft group must make its new log entries and hard state durable before
// it acknowledges them. With one log per group (the Curve/braft layout) a
// chunkserver hosting hundreds of copysets pays one fdatasync per group per
// batch; here the entries and hard states of every group that is ready go out
// in one write and are made durable with one fdatasync (group commit). While
// an fdatasync runs, new submissions queue up and form the next batch, so the
// batch grows with the load and the number of syncs per second stays bounded
// by the device. Before the writer takes a batch it yields once
// (runtime.Gosched), so that goroutines already ready to run on its thread,
// usually the Raft rounds of other copysets woken by the same burst of
// messages, queue their appends in time for it.
//
// # Segments and records
//
// The log is a sequence of segments, files taken from the chunk file pool:
// preallocated and already written with zeros, so appending never allocates
// blocks and an fdatasync costs one data flush. A segment starts with a
// header block (magic, format version, sequence number, CRC) followed by
// records:
//
//	| length u32 | crc32c u32 | type u8 | group u64 | payload (length bytes) |
//
// The CRC (Castagnoli) covers the segment's sequence number, the type, the
// group and the payload, so a record left over from an earlier use of the file
// can never validate. A record never spans segments; when a segment is full
// an end-of-segment record closes it and the log continues in the next one.
//
// # Recovery
//
// Open reads the segments in order and stops at the first record that is not
// valid: a zero length, a bad CRC or a record that overruns the segment. In
// the last segment that is the torn tail of a write that was never
// acknowledged; it is cut (the rest of the segment is zeroed and synced) so
// that stale bytes after it can never be read back as records. A segment that
// ends without its end-of-segment record ends the log there as well: whatever
// follows it belonged to the same unacknowledged batch.
//
// # Recycling
//
// A segment can be given back to the pool when no group still needs anything
// in it: every entry it holds for a group is at or below that group's
// checkpoint (chunk files fdatasynced and applied index recorded by the
// copyset), and every hard state it holds was superseded by a checkpoint
// taken after the segment was closed.
package wal
