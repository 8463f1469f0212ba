package copyset

import (
	"errors"
	"fmt"
	"math"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
)

// checkpointLocked makes the state machine durable up to the applied index
// and lets the WAL and the in-memory log drop what came before. smMu held.
//
// A failed fdatasync of the chunk files is never retried as such: Linux
// reports a writeback error once and may drop the pages that failed, so a
// second fdatasync of the same file can succeed without them. The entries
// applied since the last checkpoint are rewritten from the log instead, and
// synced again; if that fails too, the replica is failed (see fail). Either
// way the checkpoint never records an applied index past data that did not
// reach the disk.
func (c *Copyset) checkpointLocked() error {
	// Reads stop at the first chunk whose data may be lost, not once every
	// other chunk is synced: from then on the files may show what they
	// held before the writes since the last checkpoint. The store reports
	// the loss while it still holds the chunk from reads, so a read either
	// read it before the fdatasync or finds the files held (readFiles).
	if err := c.store.Sync(c.stopReads); err != nil {
		release := c.holdFiles()
		defer release()
		if err := c.rewriteSinceCheckpointLocked(err); err != nil {
			return err
		}
	} else if done := c.rewriting.Swap(nil); done != nil {
		close(*done) // a loss reported with a nil error: nothing to wait for
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
	m.Requests = c.sm.dedup.encode()
	if err := c.meta.write(m); err != nil {
		return err
	}
	c.sm.lastCkpt, c.sm.bytesSince = c.sm.applied, 0
	c.ckptIndex.Store(c.sm.applied)
	c.ckptTime.Store(c.e.now().UnixNano())
	c.sm.ckptDedup = c.sm.dedup.clone()
	c.wal.SetCheckpoint(uint64(c.id), c.sm.applied, m.hardState())
	idx, cs, epoch, reqs := c.sm.applied, c.sm.confState, c.sm.confEpoch, m.Requests
	c.callQuiet(func() { c.compact(idx, cs, epoch, reqs) })
	return nil
}

// compact trims the in-memory log after a checkpoint; Raft worker only.
func (c *Copyset) compact(idx uint64, cs *raftpb.ConfState, epoch uint64, reqs []byte) {
	if idx == 0 || cs == nil {
		return
	}
	if _, err := c.storage.CreateSnapshot(idx, cs, nil); err != nil && !errors.Is(err, raft.ErrSnapOutOfDate) {
		// Out of date means the log's snapshot is already at or past idx:
		// compacting up to idx is still right.
		c.log.Warn("record log snapshot", "index", idx, "err", err)
		return
	}
	if snap, err := c.storage.Snapshot(); err == nil && snap.GetMetadata().GetIndex() == idx {
		// What a follower receiving this snapshot learns with it.
		c.snapConfEpoch.Store(epoch)
		c.snapDedup = reqs
	}
	pressure := c.pressure.Swap(false)
	first, _ := c.storage.FirstIndex()
	if idx < first {
		return
	}
	applied, err := c.storage.Entries(first, idx+1, math.MaxUint64)
	if err != nil {
		return
	}
	// bytesFrom is the size of the entries from lo to idx.
	bytesFrom := func(lo uint64) uint64 {
		var n uint64
		for i := len(applied) - 1; i >= 0 && applied[i].GetIndex() >= lo; i-- {
			n += entryBytes(applied[i])
		}
		return n
	}
	// Compact(upTo) keeps the entries after upTo. Keep RetainBytes of the
	// newest applied entries.
	upTo := idx
	for kept := uint64(0); upTo >= first; upTo-- {
		kept += entryBytes(applied[upTo-first])
		if kept > c.e.cfg.RetainBytes {
			break
		}
	}
	if pressure {
		// Memory is short: keep nothing Raft can do without.
		upTo = idx
	}
	lag := c.e.cfg.MaxFollowerLagBytes
	// keepFrom keeps the entries from next on, if they are not too many.
	keepFrom := func(next uint64) {
		if next <= upTo && bytesFrom(next) <= lag {
			upTo = next - 1
		}
	}
	for _, s := range c.snapSending {
		// Keep what a follower receiving a snapshot will need next, or it
		// would need another snapshot once this one is in.
		keepFrom(s + 1)
	}
	if c.isLeader.Load() && !pressure {
		// Keep what active followers have not replicated yet, as long as
		// they are not too far behind: a follower that just installed a
		// snapshot then catches up from the log instead of needing another.
		c.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
			if id != c.e.cfg.NodeID && pr.RecentActive {
				keepFrom(pr.Match + 1)
			}
		})
	}
	if upTo < first {
		return // everything held is kept
	}
	// Compact(upTo) drops every entry up to upTo, that one included.
	freed := -int64(bytesFrom(first) - bytesFrom(upTo+1))
	if err := c.storage.Compact(upTo); err != nil {
		if !errors.Is(err, raft.ErrCompacted) {
			c.log.Warn("compact log", "index", upTo, "err", err)
		}
		return
	}
	c.addLog(freed)
}

// entryBytes approximates the memory an entry holds.
func entryBytes(e *raftpb.Entry) uint64 { return uint64(len(e.GetData())) + 48 }

// addLog accounts for entries added to (delta > 0) or dropped from the
// in-memory log; Raft worker only (and open).
func (c *Copyset) addLog(delta int64) {
	c.memLog.Add(delta)
	c.e.logBytes.Add(delta)
}

func (c *Copyset) finalCheckpoint() error {
	c.smMu.Lock()
	defer c.smMu.Unlock()
	if c.sm.applied == c.sm.lastCkpt {
		return nil
	}
	return c.checkpointLocked()
}

// stopReads marks the chunk files as going back in time, without waiting
// for anything (the store calls it with a chunk held from reads): reads that
// have not started wait for the files to be released, and reads under way
// discard what they read and wait too (see readFiles).
func (c *Copyset) stopReads() {
	done := make(chan struct{})
	c.rewriting.CompareAndSwap(nil, &done)
}

// holdFiles stops reads of the chunk files until the returned func is
// called: it marks them (stopReads) and waits for the reads under way,
// which discard what they read; later ones wait for the release, or for
// their deadline.
func (c *Copyset) holdFiles() (release func()) {
	c.stopReads()
	c.filesMu.Lock()
	return func() {
		c.filesMu.Unlock()
		if done := c.rewriting.Swap(nil); done != nil {
			close(*done)
		}
	}
}

// rewriteSinceCheckpointLocked repairs the chunk files after their sync
// failed with err: it rewrites what was applied since the last checkpoint
// from the log and syncs again, or fails the replica. The caller holds the
// files (holdFiles): the rewrite moves them back in time before it brings
// them forward again. smMu held.
func (c *Copyset) rewriteSinceCheckpointLocked(err error) error {
	c.log.Error("chunk files failed to sync; rewriting what was applied since the last checkpoint",
		"err", err, "checkpoint", c.sm.lastCkpt, "applied", c.sm.applied)
	if rerr := c.reapplySinceCheckpointLocked(); rerr != nil {
		err = fmt.Errorf("sync chunk files: %w; rewriting from the log: %w", err, rerr)
		c.fail(err)
		return err
	}
	if err2 := c.store.Sync(nil); err2 != nil {
		err = fmt.Errorf("sync chunk files: %w; again after rewriting them from the log: %w", err, err2)
		c.fail(err)
		return err
	}
	return nil
}

// reapplySinceCheckpointLocked writes the commands applied after the last
// checkpoint to the chunk files again, from the in-memory log (which keeps
// every entry after the last checkpoint). smMu held.
func (c *Copyset) reapplySinceCheckpointLocked() error {
	if c.sm.installed > c.sm.lastCkpt {
		// The checkpoint after an install never happened: the table of
		// applied requests at the install is not at hand.
		return fmt.Errorf("snapshot %d installed after the last checkpoint %d", c.sm.installed, c.sm.lastCkpt)
	}
	lo, hi := c.sm.lastCkpt+1, c.sm.applied+1
	if lo >= hi {
		return nil
	}
	ents, err := c.storage.Entries(lo, hi, math.MaxUint64)
	if err != nil {
		return fmt.Errorf("read entries %d..%d: %w", lo, hi-1, err)
	}
	// Replayed against the table as it was at the checkpoint, the entries
	// are written or skipped exactly as they were the first time.
	t := c.sm.ckptDedup.clone()
	for _, en := range ents {
		if en.GetType() != raftpb.EntryNormal || len(en.GetData()) == 0 {
			continue
		}
		if _, err := c.execCommand(en, t); err != nil {
			return err
		}
		if k := c.e.cfg.TestingKnobs.OnRewrite; k != nil {
			k(c.id, en.GetIndex())
		}
	}
	return nil
}
