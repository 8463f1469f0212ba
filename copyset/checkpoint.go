package copyset

import (
	"errors"
	"fmt"
	"math"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
)

func (c *Copyset) checkpointLocked() error {
	if err := c.store.Sync(); err != nil {
		return fmt.Errorf("sync chunk files: %w", err)
	}
	c.hsMu.Lock()
	hs := c.durableHS
	c.hsMu.Unlock()
	m := &meta{
		Pool: c.id.Pool(), Copyset: c.id.Copyset(),
		Applied: c.sm.applied, AppliedTerm: c.sm.appliedTerm, ConfEpoch: c.sm.confEpoch,
		Term: hs.GetTerm(), Vote: hs.GetVote(), Commit: max(hs.GetCommit(), c.sm.applied),
	}
	if c.sm.confState != nil {
		m.setConfState(c.sm.confState)
	}
	if err := writeMeta(c.dir, m); err != nil {
		return err
	}
	c.sm.lastCkpt, c.sm.lastCkptTime, c.sm.bytesSince = c.sm.applied, c.e.now(), 0
	c.wal.SetCheckpoint(uint64(c.id), c.sm.applied, m.hardState())
	idx, cs, epoch := c.sm.applied, c.sm.confState, c.sm.confEpoch
	c.call(func() { c.compact(idx, cs, epoch) })
	return nil
}

// compact trims the in-memory log after a checkpoint; Raft worker only.
func (c *Copyset) compact(idx uint64, cs *raftpb.ConfState, epoch uint64) {
	if idx == 0 || cs == nil {
		return
	}
	if _, err := c.storage.CreateSnapshot(idx, cs, nil); err != nil {
		if !errors.Is(err, raft.ErrSnapOutOfDate) {
			c.log.Warn("record log snapshot", "index", idx, "err", err)
		}
		return
	}
	c.snapConfEpoch.Store(epoch)
	upTo := idx
	if upTo > c.e.cfg.RetainEntries {
		upTo -= c.e.cfg.RetainEntries
	} else {
		return
	}
	for _, s := range c.snapSending {
		// Keep what a follower receiving a snapshot will need next.
		upTo = min(upTo, s)
	}
	if c.isLeader.Load() {
		// Keep what active followers have not replicated yet, as long as
		// they are not too far behind: a follower that just installed a
		// snapshot then catches up from the log instead of needing another.
		c.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
			if id != c.e.cfg.NodeID && pr.RecentActive && pr.Match+1 < upTo && idx-pr.Match <= c.e.cfg.MaxFollowerLag {
				upTo = max(pr.Match+1, 1)
			}
		})
	}
	if first, _ := c.storage.FirstIndex(); upTo > first {
		if err := c.storage.Compact(upTo); err != nil && !errors.Is(err, raft.ErrCompacted) {
			c.log.Warn("compact log", "index", upTo, "err", err)
		}
	}
}

func (c *Copyset) finalCheckpoint() error {
	c.smMu.Lock()
	defer c.smMu.Unlock()
	if c.sm.applied == c.sm.lastCkpt {
		return nil
	}
	return c.checkpointLocked()
}

// reapplySinceCheckpointLocked writes the commands applied after the last
// checkpoint to the chunk files again, from the in-memory log (which keeps
// every entry after the last checkpoint). smMu held.
func (c *Copyset) reapplySinceCheckpointLocked() error {
	lo, hi := max(c.sm.lastCkpt, c.sm.installed)+1, c.sm.applied+1
	if lo >= hi {
		return nil
	}
	ents, err := c.storage.Entries(lo, hi, math.MaxUint64)
	if err != nil {
		return fmt.Errorf("read entries %d..%d: %w", lo, hi-1, err)
	}
	for _, en := range ents {
		if en.GetType() != raftpb.EntryNormal || len(en.GetData()) == 0 {
			continue
		}
		if err := c.applyCommand(en); err != nil {
			return err
		}
	}
	return nil
}
