package copyset

import (
	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/copyset/wal"
)

// What the engine reports for the chunkserver's metrics.

// TransportStats returns the Raft transport's counters.
func (e *Engine) TransportStats() transport.Stats { return e.transport.Stats() }

// WALStats returns the shared WAL's segment stats.
func (e *Engine) WALStats() wal.Stats {
	return e.wal.Stats()
}

// SnapshotStats counts snapshot transfers since the engine started: sent to
// peers (and failed), and installed here.
type SnapshotStats struct{ Sent, SendFailed, Installed uint64 }

// SnapshotStats returns the engine's snapshot counts (metrics).
func (e *Engine) SnapshotStats() SnapshotStats {
	return SnapshotStats{Sent: e.snapshots.sent.Load(), SendFailed: e.snapshots.sendFailed.Load(), Installed: e.snapshots.installed.Load()}
}

// ApplyLag is how many committed entries the replicas here have not applied
// yet, summed (a metric: a lasting rise means apply cannot keep up).
func (e *Engine) ApplyLag() uint64 {
	var lag uint64
	for _, c := range e.List() {
		c.hsMu.Lock()
		commit := c.durableHS.GetCommit()
		c.hsMu.Unlock()
		if a := c.applied.Load(); commit > a {
			lag += commit - a
		}
	}
	return lag
}

// LeaderChanges is how many times a replica here saw its copyset's leader
// change after the first one it knew (a metric).
func (e *Engine) LeaderChanges() uint64 { return e.leaderChanges.Load() }

// InflightBytes reports the bytes of proposals admitted and not yet settled.
func (e *Engine) InflightBytes() int64 { return e.inflight.Load() }

// LogBytes reports the bytes of entries the copysets hold in memory.
func (e *Engine) LogBytes() int64 { return e.logBytes.Load() }
