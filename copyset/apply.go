package copyset

import (
	"errors"
	"fmt"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/chunkfilepool"
)

func (c *Copyset) pushApply(it applyItem) {
	select {
	case <-c.quit:
		return
	default:
	}
	c.amu.Lock()
	c.applyQ = append(c.applyQ, it)
	push := c.asched.signal()
	c.amu.Unlock()
	if push {
		c.e.applyQ.push(c)
	}
}

func (c *Copyset) requestCheckpoint() {
	if !c.ckptReq.Swap(true) {
		c.pushApply(applyItem{ckpt: true})
	}
}

// maybeTimedCheckpoint asks for a checkpoint when the last one is older than
// CheckpointInterval and entries were applied since. It runs on the ticker
// and reads only atomics: the state machine's lock may be held for a whole
// checkpoint of a slow disk, and the ticker must never wait for it.
func (c *Copyset) maybeTimedCheckpoint() {
	last := time.Unix(0, c.ckptTime.Load())
	if c.applied.Load() > c.ckptIndex.Load() && c.e.now().Sub(last) >= c.e.cfg.CheckpointInterval {
		c.requestCheckpoint()
	}
}

// Apply failures. An entry that cannot be applied is never skipped (the
// replica's chunk files would diverge from its peers'): the apply of the
// copyset is parked and retried with a backoff, off the shared worker. A
// full chunk file pool is waited out for as long as it lasts; any other
// error is retried maxApplyAttempts times, then the replica is failed (see
// fail) and rebuilt from its peers.
const (
	maxApplyAttempts = 5
	maxApplyBackoff  = time.Second
)

// runApply applies queued committed entries. It runs on an apply worker and
// never waits for storage to recover: a failed apply is parked (see
// parkApply).
func (c *Copyset) runApply() {
	c.amu.Lock()
	c.asched.begin()
	// A snapshot install holds the state machine for the whole transfer;
	// it reschedules the copyset when it is done. An apply worker never
	// waits for it.
	if c.installing.Load() || !c.smMu.TryLock() {
		c.asched.running, c.asched.again = false, false
		if !c.installing.Load() {
			// Held briefly by someone else: try again shortly.
			c.applyRetry = time.AfterFunc(10*time.Millisecond, func() { c.pushApply(applyItem{}) })
		}
		c.aidle.Broadcast()
		c.amu.Unlock()
		return
	}
	items := c.applyQ
	c.applyQ = nil
	c.amu.Unlock()
	select {
	case <-c.quit:
		c.smMu.Unlock()
		c.finishApplyRun()
		return
	default:
	}

	for i, it := range items {
		switch {
		case it.snap != nil:
			c.snapshotPersisted(it.snap)
		case it.m != nil:
			ents := it.m.GetEntries()
			n, err := c.applyEntries(ents)
			if errors.Is(err, ErrStopped) {
				c.smMu.Unlock()
				c.finishApplyRun()
				return
			}
			if err != nil {
				// Put the rest back in front of what queued meanwhile.
				rest := &raftpb.Message{Entries: ents[n:], Responses: it.m.GetResponses()}
				items[i] = applyItem{m: rest}
				c.smMu.Unlock()
				c.parkApply(items[i:], err)
				return
			}
			resps := it.m.GetResponses()
			c.enqueue(func(in *inbox) { in.local = append(in.local, resps...) })
		}
	}
	c.applyFails = 0
	c.releaseReads()
	if c.ckptReq.Swap(false) || c.sm.bytesSince >= c.e.cfg.CheckpointBytes {
		if err := c.checkpointLocked(); err != nil {
			c.log.Error("checkpoint failed", "err", err)
		}
	}
	c.smMu.Unlock()
	c.finishApplyRun()
}

// parkApply puts items back at the head of the apply queue after the first
// of them failed with err, and retries them after a backoff; or fails the
// replica when the error persists.
func (c *Copyset) parkApply(items []applyItem, err error) {
	c.applyErrs.Add(1)
	c.applyFails++
	space := errors.Is(err, chunkfilepool.ErrPoolEmpty)
	if !space && c.applyFails >= maxApplyAttempts {
		c.fail(fmt.Errorf("apply: %w", err))
		c.finishApplyRun()
		return
	}
	if c.applyFails == 1 || c.applyFails%20 == 0 {
		c.log.Error("cannot apply entry; retrying", "attempt", c.applyFails, "err", err)
	}
	backoff := min(time.Duration(c.applyFails)*20*time.Millisecond, maxApplyBackoff)
	c.amu.Lock()
	c.applyQ = append(items, c.applyQ...)
	c.asched.running = false
	// Work that arrived meanwhile waits for the retry too: apply order.
	c.asched.again = false
	if c.applyRetry != nil {
		c.applyRetry.Stop()
	}
	c.applyRetry = time.AfterFunc(backoff, func() { c.pushApply(applyItem{}) })
	c.aidle.Broadcast()
	c.amu.Unlock()
}

func (c *Copyset) finishApplyRun() {
	c.amu.Lock()
	again := c.asched.end()
	c.aidle.Broadcast()
	c.amu.Unlock()
	if again {
		c.e.applyQ.push(c)
	}
}

// applyEntries applies committed entries in order. It returns how many it
// applied and, if it stopped early, why: ErrStopped when the copyset is shut
// down, otherwise the storage error of the entry it could not apply.
func (c *Copyset) applyEntries(ents []*raftpb.Entry) (int, error) {
	for i, en := range ents {
		idx := en.GetIndex()
		switch en.GetType() {
		case raftpb.EntryConfChange, raftpb.EntryConfChangeV2:
			// Raft hands out a membership change only if it must be applied
			// to it, even when the chunk files already reflect it.
			if !c.applyConfChange(en) {
				return i, ErrStopped
			}
		case raftpb.EntryNormal:
			if idx <= c.sm.applied {
				break
			}
			if idx <= c.sm.installed {
				c.recordInstalled(en)
				break
			}
			if len(en.GetData()) > 0 {
				if err := c.applyCommand(en); err != nil {
					return i, err
				}
			}
		}
		if idx > c.sm.applied {
			c.sm.applied, c.sm.appliedTerm = idx, en.GetTerm()
			c.applied.Store(idx)
		}
		c.settleWaiters(en)
	}
	return len(ents), nil
}

// recordInstalled takes an entry that an installed snapshot's chunk files
// already hold into the table of applied requests, without writing it. It
// matters when Raft did not adopt the install (a newer leader had caught the
// replica up by appends meanwhile): the snapshot's own table then never
// replaces this one, and a retry of the entry's request must still be
// skipped here as on every other replica.
func (c *Copyset) recordInstalled(en *raftpb.Entry) {
	if len(en.GetData()) == 0 {
		return
	}
	cmd, err := decodeCommand(en.GetData())
	if err != nil {
		return // skipped by every replica (execCommand)
	}
	c.sm.dedup.advance(cmd.req, en.GetIndex())
	if !c.sm.dedup.applied(cmd.req) {
		c.sm.dedup.record(cmd.req)
	}
}

// applyCommand applies one write or delete to the chunk files, unless its
// client request was applied before.
func (c *Copyset) applyCommand(en *raftpb.Entry) error {
	applied, err := c.execCommand(en, c.sm.dedup)
	if applied {
		c.sm.bytesSince += uint64(len(en.GetData()))
	}
	return err
}

// execCommand applies one command entry against the table of applied
// requests t, which it updates. It reports whether it wrote (false for an
// entry skipped as a repeat, or undecodable).
func (c *Copyset) execCommand(en *raftpb.Entry, t *dedupTable) (bool, error) {
	cmd, err := decodeCommand(en.GetData())
	if err != nil {
		// Every replica sees the same bytes; skipping is deterministic.
		c.log.Error("skipping undecodable entry", "index", en.GetIndex(), "err", err)
		return false, nil
	}
	t.advance(cmd.req, en.GetIndex())
	if t.applied(cmd.req) {
		c.repeats.Add(1)
		return false, nil
	}
	switch cmd.op {
	case opWrite:
		if cmd.clone {
			err = c.store.WriteClone(cmd.chunk, cmd.data, int64(cmd.offset), cmd.seq.SN, cmd.seq.Keep, cmd.fill, int64(cmd.fillOff))
		} else {
			err = c.store.WriteAtSN(cmd.chunk, cmd.data, int64(cmd.offset), cmd.seq.SN, cmd.seq.Keep)
		}
	case opDelete:
		if cmd.clone {
			err = c.store.ZeroSN(cmd.chunk, cmd.seq.SN, cmd.seq.Keep)
		} else {
			err = c.store.DeleteSN(cmd.chunk, cmd.seq.SN, cmd.seq.Keep)
		}
	case opTrim:
		live, bound, _ := decodeTrim(cmd.data) // checked by decodeCommand
		err = c.store.Trim(cmd.chunk, live, bound)
	}
	if err != nil {
		return false, fmt.Errorf("entry %d, chunk %d: %w", en.GetIndex(), cmd.chunk, err)
	}
	t.record(cmd.req)
	return true, nil
}

func (c *Copyset) applyConfChange(en *raftpb.Entry) bool {
	var cc raftpb.ConfChangeI
	if en.GetType() == raftpb.EntryConfChange {
		v := &raftpb.ConfChange{}
		if err := proto.Unmarshal(en.GetData(), v); err != nil {
			c.log.Error("undecodable membership change", "index", en.GetIndex(), "err", err)
			return true
		}
		cc = v
	} else {
		v := &raftpb.ConfChangeV2{}
		if err := proto.Unmarshal(en.GetData(), v); err != nil {
			c.log.Error("undecodable membership change", "index", en.GetIndex(), "err", err)
			return true
		}
		cc = v
	}
	var cs *raftpb.ConfState
	done := make(chan struct{})
	if !c.call(func() { cs = c.rn.ApplyConfChange(cc); c.setMembers(cs); close(done) }) {
		return false
	}
	select {
	case <-done:
	case <-c.quit:
		return false
	}
	if en.GetIndex() > c.sm.confEpoch {
		c.sm.confState = cs
		c.sm.confEpoch = en.GetIndex()
		c.confEpoch.Store(en.GetIndex())
		c.log.Info("membership changed", "index", en.GetIndex(), "voters", cs.GetVoters(), "learners", cs.GetLearners())
	}
	// The first membership change applied on a new replica makes it part of
	// the copyset; checkpoint so the configuration survives a restart early.
	c.ckptReq.Store(true)
	return true
}

// settleWaiters finishes the proposal applied at en's index, and fails
// proposals that can no longer be applied.
func (c *Copyset) settleWaiters(en *raftpb.Entry) {
	idx := en.GetIndex()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if len(c.waiters) == 0 {
		return
	}
	if p := c.byIndex[idx]; p != nil {
		delete(c.byIndex, idx)
		proposer, id, ok := proposalKey(en.GetData())
		if en.GetType() == raftpb.EntryNormal && ok && proposer == c.e.cfg.NodeID && id == p.id {
			delete(c.waiters, p.id)
			if f := c.e.cfg.OnProposalApplied; f != nil && !p.committed.IsZero() {
				now := time.Now()
				f(ProposalTimes{Commit: p.committed.Sub(p.start), Apply: now.Sub(p.committed)})
			}
			p.finish(idx, nil)
		} else {
			delete(c.waiters, p.id)
			p.finish(0, ErrProposalLost)
		}
	} else if en.GetType() == raftpb.EntryNormal {
		// Applied without its index being known here (proposed before a
		// restart of leadership bookkeeping): match by id.
		if proposer, id, ok := proposalKey(en.GetData()); ok && proposer == c.e.cfg.NodeID {
			if p := c.waiters[id]; p != nil {
				delete(c.waiters, id)
				p.finish(idx, nil)
			}
		}
	}
	// Log terms only grow: once an entry of a newer term is applied at or
	// below a proposal's index, that proposal's entry can never commit.
	if en.GetTerm() <= c.waitTerm {
		return
	}
	c.waitTerm = en.GetTerm()
	for id, p := range c.waiters {
		if p.index != 0 && p.index >= idx && p.term < en.GetTerm() {
			delete(c.waiters, id)
			delete(c.byIndex, p.index)
			p.finish(0, ErrProposalLost)
		}
	}
}
