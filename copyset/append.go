package copyset

import (
	"errors"
	"fmt"
	"math"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/copyset/wal"
)

// submitAppend hands a MsgStorageAppend to the WAL. A hard state whose only
// change is the commit index is not written (raft.MustSync): a lower commit
// index after a restart is learnt again from the leader, and writing it
// would cost an fdatasync per write on every replica. Such an append still
// completes in order, after everything submitted before it is durable.
func (c *Copyset) submitAppend(m *raftpb.Message) {
	a := wal.Append{Group: uint64(c.id), Entries: m.GetEntries()}
	if m.Term != nil {
		hs := &raftpb.HardState{Term: m.Term, Vote: m.Vote, Commit: m.Commit}
		if prev := c.loggedHS; prev == nil || raft.MustSync(hs, prev, len(a.Entries)) || m.GetSnapshot() != nil {
			a.HardState = hs
			c.loggedHS = hs
		}
	}
	if s := m.GetSnapshot(); s != nil && !raft.IsEmptySnap(s) {
		md := s.GetMetadata()
		c.setMembers(md.GetConfState())
		a.Snapshot = &wal.SnapshotMark{Index: md.GetIndex(), Term: md.GetTerm(), ConfState: md.GetConfState(), ConfEpoch: c.installEpoch.Load()}
		if reqs := c.installDedup.Load(); reqs != nil {
			a.Snapshot.Requests = *reqs
		}
	}
	// A follower's answers (append and vote answers to the leader or a
	// candidate) go out once the append is durable, at once, instead of
	// after a turn of the Raft worker: they only state what is durable
	// now. An append that installs a snapshot answers from the Raft
	// worker, once the log storage holds the snapshot.
	//
	// A follower's lone append is made durable by this goroutine (the
	// transport's reader, usually) when the WAL is idle, and its answers
	// sent from here too (wal.TryCommit, transport.SendNow): at low load a
	// write then crosses no goroutine hand-off on a follower. A leader's
	// goes to the WAL's writer, so that its round goes on meanwhile.
	direct := a.Snapshot == nil
	done := func(err error, here bool) {
		sent := direct && err == nil
		queued := c.enqueue(func(in *inbox) { in.appended = append(in.appended, appendDone{m: m, err: err, sent: sent}) })
		if sent && queued { // a stopped replica says nothing more
			for _, r := range m.GetResponses() {
				if c.sendsDirect(r) {
					c.sendAnswer(r, here)
				}
			}
		}
	}
	if !c.isLeader.Load() {
		if wrote, err := c.wal.TryCommit(a); wrote {
			done(err, true)
			return
		}
	}
	c.wal.Submit(a, func(err error) { done(err, false) })
}

// finishAppend runs once the WAL made a MsgStorageAppend durable: it updates
// the in-memory log and delivers the responses the write was holding back.
func (c *Copyset) finishAppend(a appendDone) {
	if a.err != nil {
		if !errors.Is(a.err, wal.ErrClosed) {
			// The WAL is shared: every copyset of the chunkserver stops.
			c.e.failStorage(fmt.Errorf("write-ahead log: %w", a.err))
		}
		return
	}
	m := a.m
	if s := m.GetSnapshot(); s != nil && !raft.IsEmptySnap(s) {
		if err := c.storage.ApplySnapshot(s); err != nil && !errors.Is(err, raft.ErrSnapOutOfDate) {
			c.log.Error("apply snapshot to log storage", "err", err)
			return
		} else if err == nil {
			c.addLog(-c.memLog.Load())
		}
		c.pushApply(applyItem{snap: s})
	}
	if ents := m.GetEntries(); len(ents) > 0 {
		// Entries at or after the first new one are replaced.
		var replaced int64
		if last, _ := c.storage.LastIndex(); ents[0].GetIndex() <= last {
			lo, _ := c.storage.FirstIndex()
			if old, err := c.storage.Entries(max(ents[0].GetIndex(), lo), last+1, math.MaxUint64); err == nil {
				for _, en := range old {
					replaced += int64(entryBytes(en))
				}
			}
		}
		first, _ := c.storage.FirstIndex()
		if err := c.storage.Append(ents); err != nil {
			c.log.Error("append to log storage", "err", err)
			return
		}
		added := -replaced
		for _, en := range ents {
			if en.GetIndex() >= first { // older ones were compacted away and are not kept
				added += int64(entryBytes(en))
			}
		}
		c.addLog(added)
	}
	if m.Term != nil {
		t, v, cm := m.GetTerm(), m.GetVote(), m.GetCommit()
		hs := &raftpb.HardState{Term: &t, Vote: &v, Commit: &cm}
		if err := c.storage.SetHardState(hs); err != nil {
			c.log.Error("set hard state", "err", err)
			return
		}
		c.hsMu.Lock()
		c.durableHS = hs
		c.hsMu.Unlock()
	}
	for _, r := range m.GetResponses() {
		switch {
		case r.GetTo() == c.e.cfg.NodeID:
			_ = c.rn.Step(r)
		case !a.sent || !c.sendsDirect(r):
			c.send(r)
		}
	}
}

// sendAnswer sends a follower's answer to an append or vote: now, on this
// goroutine, when the append was made durable here (submitAppend).
func (c *Copyset) sendAnswer(m *raftpb.Message, now bool) {
	if now {
		c.e.transport.SendNow(uint64(c.id), m)
		return
	}
	c.e.transport.Send(uint64(c.id), m)
}
