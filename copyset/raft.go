package copyset

import (
	"context"
	"errors"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/copyset/wal"
)

// enqueue runs f under the inbox lock and schedules the copyset.
func (c *Copyset) enqueue(f func(in *inbox)) bool {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return false
	}
	f(&c.in)
	push := c.sched.signal()
	c.mu.Unlock()
	if push {
		c.e.raftQ.push(c)
	}
	return true
}

func (c *Copyset) deliver(m *raftpb.Message) {
	c.enqueue(func(in *inbox) { in.msgs = append(in.msgs, m) })
}

func (c *Copyset) tick() { c.enqueue(func(in *inbox) { in.ticks++ }) }

// call runs f on the Raft worker with the RawNode at hand.
func (c *Copyset) call(f func()) bool {
	return c.enqueue(func(in *inbox) { in.calls = append(in.calls, f) })
}

// callWait runs f on the Raft worker and waits for it.
func (c *Copyset) callWait(ctx context.Context, f func()) error {
	done := make(chan struct{})
	if !c.call(func() { f(); close(done) }) {
		return ErrStopped
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.e.stopped:
		return ErrStopped
	}
}

func (c *Copyset) stop() {
	c.mu.Lock()
	c.stopped = true
	c.in = inbox{}
	c.mu.Unlock()
	c.wmu.Lock()
	for id, p := range c.waiters {
		p.finish(0, ErrStopped)
		delete(c.waiters, id)
	}
	c.byIndex = map[uint64]*Proposal{}
	for _, r := range c.readWait {
		r.done <- ErrStopped
	}
	c.readWait = nil
	c.wmu.Unlock()
}

// runRaft processes everything in the inbox and handles the Ready states it
// produces. It runs on a Raft worker.
func (c *Copyset) runRaft() {
	c.mu.Lock()
	c.sched.begin()
	in := c.in
	c.in = inbox{}
	stopped := c.stopped
	c.mu.Unlock()
	if !stopped {
		c.process(&in)
	}
	c.mu.Lock()
	again := c.sched.end()
	c.mu.Unlock()
	if again {
		c.e.raftQ.push(c)
	}
}

func (c *Copyset) process(in *inbox) {
	rn := c.rn
	for _, a := range in.appended {
		c.finishAppend(a)
	}
	for _, m := range in.local {
		_ = rn.Step(m)
	}
	for _, m := range in.msgs {
		_ = rn.Step(m)
	}
	for _, f := range in.calls {
		f()
	}
	for i := 0; i < min(in.ticks, 3); i++ {
		rn.Tick()
	}
	if in.ticks > 0 {
		c.expireReads()
	}
	for _, p := range in.props {
		c.propose(p)
	}
	if len(in.reads) > 0 {
		c.startReads(in.reads)
	}
	for rn.HasReady() {
		c.handleReady(rn.Ready())
	}
}

// finishAppend runs once the WAL made a MsgStorageAppend durable: it updates
// the in-memory log and delivers the responses the write was holding back.
func (c *Copyset) finishAppend(a appendDone) {
	if a.err != nil {
		if !errors.Is(a.err, wal.ErrClosed) {
			c.log.Error("write-ahead log append failed; copyset stalls", "err", a.err)
		}
		return
	}
	m := a.m
	if s := m.GetSnapshot(); s != nil && !raft.IsEmptySnap(s) {
		if err := c.storage.ApplySnapshot(s); err != nil && !errors.Is(err, raft.ErrSnapOutOfDate) {
			c.log.Error("apply snapshot to log storage", "err", err)
			return
		}
		c.pushApply(applyItem{snap: s})
	}
	if len(m.GetEntries()) > 0 {
		if err := c.storage.Append(m.GetEntries()); err != nil {
			c.log.Error("append to log storage", "err", err)
			return
		}
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
		if r.GetTo() == c.e.cfg.NodeID {
			_ = c.rn.Step(r)
		} else {
			c.send(r)
		}
	}
}

func (c *Copyset) send(m *raftpb.Message) {
	if m.GetType() == raftpb.MsgSnap {
		c.startSnapshotSend(m)
		return
	}
	c.e.transport.Send(uint64(c.id), m)
}

// logLeaderChange records, at info level, the leader changes an operator
// should see: a copyset losing the leader it had and a new leader taking
// over. The first election after start is logged at debug level only.
func (c *Copyset) logLeaderChange(lead uint64, state raft.StateType) {
	switch {
	case lead == 0:
		c.log.Info("copyset lost its leader", "leader", c.knownLead, "state", state.String())
	case c.knownLead == 0:
		c.log.Debug("copyset leader elected", "leader", lead)
		c.knownLead = lead
	default:
		c.log.Info("copyset leader elected", "previous", c.knownLead, "leader", lead, "term", c.rn.BasicStatus().GetTerm())
		c.knownLead = lead
	}
}

func (c *Copyset) handleReady(rd raft.Ready) {
	if ss := rd.SoftState; ss != nil {
		wasLeader := c.isLeader.Load()
		lead := ss.Lead
		isLeader := ss.RaftState == raft.StateLeader
		prev := c.leader.Swap(lead)
		c.isLeader.Store(isLeader)
		if prev != lead {
			c.logLeaderChange(lead, ss.RaftState)
		}
		if isLeader && !wasLeader {
			c.termStart = 0
			c.log.Debug("became leader")
		}
		if !isLeader && wasLeader {
			c.leaseUntil = time.Time{}
			c.failReadBatches(&NotLeaderError{Leader: lead})
		}
	}
	if hs := rd.HardState; hs != nil && hs.Term != nil {
		c.term.Store(hs.GetTerm())
	}
	for _, rs := range rd.ReadStates {
		c.readIndexDone(rs)
	}
	if c.isLeader.Load() && len(rd.Entries) > 0 {
		st := c.rn.BasicStatus()
		term := st.GetTerm()
		for _, en := range rd.Entries {
			if c.termStart == 0 && en.GetTerm() == term {
				c.termStart = en.GetIndex()
			}
			if en.GetType() == raftpb.EntryNormal {
				if proposer, id, ok := proposalKey(en.GetData()); ok && proposer == c.e.cfg.NodeID {
					c.assignIndex(id, en.GetIndex(), en.GetTerm())
				}
			}
		}
	}
	for _, m := range rd.Messages {
		switch m.GetTo() {
		case raft.LocalAppendThread:
			c.submitAppend(m)
		case raft.LocalApplyThread:
			c.pushApply(applyItem{m: m})
		default:
			if m.GetType() == raftpb.MsgTimeoutNow {
				// Leadership is being handed over: the target may win an
				// election at once, so the lease is void from now on.
				c.leaseUntil = time.Time{}
			}
			c.send(m)
		}
	}
}

func (c *Copyset) submitAppend(m *raftpb.Message) {
	a := wal.Append{Group: uint64(c.id), Entries: m.GetEntries()}
	if m.Term != nil {
		a.HardState = &raftpb.HardState{Term: m.Term, Vote: m.Vote, Commit: m.Commit}
	}
	if s := m.GetSnapshot(); s != nil && !raft.IsEmptySnap(s) {
		md := s.GetMetadata()
		a.Snapshot = &wal.SnapshotMark{Index: md.GetIndex(), Term: md.GetTerm(), ConfState: md.GetConfState()}
	}
	c.wal.Submit(a, func(err error) {
		c.enqueue(func(in *inbox) { in.appended = append(in.appended, appendDone{m: m, err: err}) })
	})
}
