package copyset

import (
	"context"
	"fmt"
	"runtime/debug"
	"slices"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// enqueue runs f under the inbox lock and schedules the copyset.
func (c *Copyset) enqueue(f func(in *inbox)) bool {
	queued, run := c.enqueueTake(f)
	if run {
		c.e.raftQ.push(c)
	}
	return queued
}

// enqueueTake runs f under the inbox lock. It reports whether f ran (the
// replica is not stopped) and whether the copyset is the caller's to run:
// no worker has it queued or running, and the caller must either call
// runRaft itself or push it onto the Raft queue.
//
// Running it in the caller spares a worker's wake-up on the path of a
// write: the proposal's request goroutine proposes at once, and the
// transport's reader steps an append or its answer at once (each wake-up
// of a worker cost tens of microseconds of a QD1 write on a busy machine).
// A Raft round does not wait for IO (appends go to the WAL's queue,
// messages to the transport's), so the caller is held for microseconds;
// what arrives meanwhile is left to the workers (runRaft queues the
// copyset again). The exception is a follower's lone append to an idle
// WAL, which the round writes itself (submitAppend, wal.TryCommit).
func (c *Copyset) enqueueTake(f func(in *inbox)) (queued, run bool) {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return false, false
	}
	f(&c.in)
	run = c.sched.signal()
	c.mu.Unlock()
	return true, run
}

// deliver hands a message from a peer to the replica, stepping it in the
// caller when no worker has the copyset (enqueueTake).
func (c *Copyset) deliver(m *raftpb.Message) {
	if _, run := c.enqueueTake(func(in *inbox) { in.msgs = append(in.msgs, m) }); run {
		c.runRaft()
	}
}

func (c *Copyset) tick() { c.enqueue(func(in *inbox) { in.ticks++ }) }

// call runs f on the Raft worker with the RawNode at hand.
func (c *Copyset) call(f func()) bool {
	return c.enqueue(func(in *inbox) { in.calls = append(in.calls, f) })
}

// callQuiet is call for work that does not wake a quiesced group (it
// reads state or trims memory).
func (c *Copyset) callQuiet(f func()) bool {
	return c.enqueue(func(in *inbox) { in.quiet = append(in.quiet, f) })
}

// callWait runs f on the Raft worker and waits for it.
func (c *Copyset) callWait(ctx context.Context, f func()) error {
	return c.waitFor(ctx, c.call, f)
}

// callQuietWait is callWait for work that does not wake a quiesced group.
func (c *Copyset) callQuietWait(ctx context.Context, f func()) error {
	return c.waitFor(ctx, c.callQuiet, f)
}

func (c *Copyset) waitFor(ctx context.Context, call func(func()) bool, f func()) error {
	done := make(chan struct{})
	if !call(func() { f(); close(done) }) {
		return ErrStopped
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.quit:
		return ErrStopped
	}
}

// stop shuts the replica down for good: its inbox is dropped, no worker
// runs it again, and its waiting callers fail with ErrStopped. It waits for
// a Raft or apply worker that is running the copyset to finish, so that
// nothing of it reaches the WAL or the chunk files afterwards. It must not
// be called from the copyset's own workers (see fail).
func (c *Copyset) stop() {
	c.mu.Lock()
	c.stopLocked()
	for c.sched.running {
		c.idle.Wait()
	}
	c.mu.Unlock()
	c.amu.Lock()
	c.applyQ = nil
	if c.applyRetry != nil {
		c.applyRetry.Stop()
	}
	for c.asched.running {
		c.aidle.Wait()
	}
	c.amu.Unlock()
	c.failWaiters(ErrStopped)
}

// stopLocked marks the replica stopped; c.mu held.
func (c *Copyset) stopLocked() {
	if !c.stopped {
		c.stopped = true
		close(c.quit)
	}
	c.lease.Store(nil)
	c.in = inbox{}
}

// failWaiters fails every waiting proposal and read.
func (c *Copyset) failWaiters(err error) {
	c.wmu.Lock()
	for id, p := range c.waiters {
		p.finish(0, err)
		delete(c.waiters, id)
	}
	c.byIndex = map[uint64]*Proposal{}
	for _, r := range c.readWait {
		r.done <- err
	}
	c.readWait = nil
	c.wmu.Unlock()
}

// fail takes a replica whose storage failed out of service: it stops
// taking work, voting, acknowledging and applying, so that its peers elect
// a leader without it within an election timeout, and it reports err from
// Broken. Unlike stop it does not wait for the workers (it may run on one).
// The replica stays broken until it is removed and rebuilt from its peers.
func (c *Copyset) fail(err error) {
	c.mu.Lock()
	if c.broken != nil {
		c.mu.Unlock()
		return
	}
	c.broken = err
	c.stopLocked()
	c.mu.Unlock()
	c.amu.Lock()
	c.applyQ = nil
	if c.applyRetry != nil {
		c.applyRetry.Stop()
	}
	c.amu.Unlock()
	c.isLeader.Store(false)
	c.lease.Store(nil)
	c.leader.Store(0)
	c.log.Error("copyset replica broken: it stops serving until it is rebuilt from its peers", "err", err)
	c.failWaiters(fmt.Errorf("%w: %w", ErrBroken, err))
}

// Broken reports why the replica stopped serving (its storage failed), or
// nil while it is healthy.
func (c *Copyset) Broken() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken
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
		c.processSafely(&in)
	}
	c.mu.Lock()
	again := c.sched.end() && !c.stopped
	c.idle.Broadcast()
	c.mu.Unlock()
	if again {
		c.e.raftQ.push(c)
	}
}

// processSafely is process with Raft's panics contained: a panic (state a
// message planted that the checks did not foresee, surfacing in a tick, a
// campaign or a Ready) takes this replica out of service, not the process.
func (c *Copyset) processSafely(in *inbox) {
	defer func() {
		if r := recover(); r != nil {
			c.fail(fmt.Errorf("raft panicked: %v\n%s", r, debug.Stack()))
		}
	}()
	c.process(in)
}

func (c *Copyset) process(in *inbox) {
	rn := c.rn
	for _, a := range in.appended {
		c.finishAppend(a)
	}
	for _, m := range in.local {
		if m.GetType() == raftpb.MsgSnap { // from the install stream: heard from its leader
			if c.heard == nil {
				c.heard = map[uint64]time.Time{}
			}
			c.heard[m.GetFrom()] = c.e.now()
			c.silentTicks = 0
		}
		if !c.step(m) {
			return
		}
	}
	// Ticks go first: a tick that was due before a message arrived must not
	// count as time passed since that message. A follower counts its
	// election timeout from the last message of its leader, and the
	// leader's read lease relies on that count never running ahead of the
	// clock (see leaseDuration).
	if c.quiesced.Load() && !in.active() {
		in.ticks = 0 // queued before the group quiesced
	}
	lead := rn.BasicStatus().Lead
	for i := 0; i < min(in.ticks, 3); i++ {
		rn.Tick()
		// A leader hears itself: only a follower counts silence.
		if lead = rn.BasicStatus().Lead; lead == c.e.cfg.NodeID {
			c.silentTicks = 0
		} else {
			c.silentTicks++
		}
	}
	if in.ticks > 0 {
		c.expireReads()
	}
	var now time.Time
	if len(in.msgs) > 0 {
		now = c.e.now()
		if c.heard == nil {
			c.heard = map[uint64]time.Time{}
		}
	}
	lastIndex := c.logLast
	for _, m := range in.msgs {
		if err := c.admit(m, lastIndex); err != nil {
			c.refuse(m, err)
			continue
		}
		if c.refuseVote(m) {
			continue
		}
		if m.GetFrom() == lead {
			c.silentTicks = 0
		}
		c.heard[m.GetFrom()] = now
		if m.GetType() == raftpb.MsgHeartbeatResp {
			c.beatResp = append(c.beatResp, m.GetFrom())
		}
		if m.GetType() == raftpb.MsgHeartbeatResp && isQuiesceBeat(m) {
			c.noteBeatAnswer(m)
		}
		if !c.step(m) {
			return
		}
		if n := len(m.GetEntries()); m.GetType() == raftpb.MsgApp && n > 0 {
			// The append may have cut a divergent tail: hold the rest of
			// the batch to the log it can have left (never above).
			lastIndex = min(lastIndex, m.GetIndex()+uint64(n))
		}
	}
	if len(in.msgs) > 0 && rn.BasicStatus().Lead != lead {
		// A new leader (or none): its silence counts from now.
		c.silentTicks = 0
	}
	if in.ticks > 0 {
		c.maybeCampaign()
	}
	for _, f := range in.calls {
		f()
	}
	for _, f := range in.quiet {
		f()
	}
	for _, p := range in.props {
		c.propose(p)
	}
	if len(in.reads) > 0 {
		c.startReads(in.reads, in.active())
	}
	c.noteQuiet(in)
	for rn.HasReady() {
		c.handleReady(rn.Ready())
	}
	c.beatResp = c.beatResp[:0]
}

// refuseVote drops vote and pre-vote requests for one election timeout after
// the replica started. Before it restarted it may have heard from a leader
// that still holds a read lease; a follower that kept running would refuse
// such votes (CheckQuorum) until its election timeout since that leader's
// last message ran out, and a restarted one must not be quicker. A vote of
// a leadership transfer is let through: the transferring leader ended its
// lease when it started the transfer.
func (c *Copyset) refuseVote(m *raftpb.Message) bool {
	t := m.GetType()
	if t != raftpb.MsgVote && t != raftpb.MsgPreVote {
		return false
	}
	if string(m.GetContext()) == campaignTransfer {
		return false
	}
	return c.e.now().Sub(c.startedAt) < c.e.electionTimeout()
}

// campaignMarginTicks is how many ticks past the election timeout the
// designated follower waits before it campaigns (see maybeCampaign): the
// other followers count their own timeouts from about the same last
// heartbeat, on tickers whose phases differ by up to one tick, and must be
// past theirs to grant the pre-vote.
const campaignMarginTicks = 2

// maybeCampaign starts an election at once when this follower has not heard
// from its leader for the election timeout plus a margin and it is the
// designated successor: the voter with the lowest id other than the leader.
// Raft alone waits a random timeout between one and two election timeouts
// so that candidates rarely collide; naming one candidate removes the
// collision without the random wait, so losing a leader stalls IO for
// little more than one election timeout. It changes nothing Raft's safety
// or the read lease relies on: the other voters still refuse (pre-)votes
// until their own election timeouts since the leader's last message ran
// out, and if one does, Raft's random timeouts take over as before.
func (c *Copyset) maybeCampaign() {
	if c.silentTicks < c.e.cfg.ElectionTicks+campaignMarginTicks {
		return
	}
	st := c.rn.Status()
	if st.RaftState != raft.StateFollower || st.Lead == 0 {
		return
	}
	c.silentTicks = 0
	var successor uint64
	for id := range st.Config.Voters.IDs() {
		if id != st.Lead && (successor == 0 || id < successor) {
			successor = id
		}
	}
	if successor != c.e.cfg.NodeID {
		return
	}
	c.log.Info("leader silent for the election timeout; campaigning as its designated successor", "leader", st.Lead, "term", st.GetTerm())
	_ = c.rn.Campaign()
}

// campaignTransfer is the context raft puts in the votes of a leadership
// transfer.
const campaignTransfer = "CampaignTransfer"

func (c *Copyset) send(m *raftpb.Message) {
	if m.GetType() == raftpb.MsgSnap {
		c.startSnapshotSend(m)
		return
	}
	c.e.transport.Send(uint64(c.id), m)
}

// logLeaderChange records the leader changes of a copyset at debug level
// (one chunkserver's pause makes a hundred copysets elect); the count
// (leaderChanges) feeds the chunkserver's periodic summary at info level.
func (c *Copyset) logLeaderChange(lead uint64, state raft.StateType) {
	switch {
	case lead == 0:
		c.log.Debug("copyset lost its leader", "leader", c.knownLead, "state", state.String())
	case c.knownLead == 0:
		c.log.Debug("copyset leader elected", "leader", lead)
		c.knownLead = lead
	default:
		c.log.Debug("copyset leader elected", "previous", c.knownLead, "leader", lead, "term", c.rn.BasicStatus().GetTerm())
		c.knownLead = lead
		c.e.leaderChanges.Add(1)
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
			// The log may end in a membership change of an earlier
			// term: the first commit that covers it goes to everyone.
			c.confIndex = c.logLast
			c.leadSince = c.e.now()
			c.log.Debug("became leader")
		}
		if !isLeader && wasLeader {
			c.leaseUntil = time.Time{}
			c.lease.Store(nil)
			c.failReadBatches(&NotLeaderError{Leader: lead})
		}
	}
	if hs := rd.HardState; hs != nil && hs.Term != nil {
		c.term.Store(hs.GetTerm())
	}
	if s := rd.Snapshot; s != nil && !raft.IsEmptySnap(s) {
		c.logLast = s.GetMetadata().GetIndex() // the log restarts at the snapshot
	}
	if n := len(rd.Entries); n > 0 {
		c.logLast = rd.Entries[n-1].GetIndex()
	}
	for _, rs := range rd.ReadStates {
		c.readIndexDone(rs)
	}
	if c.isLeader.Load() && len(rd.Entries) > 0 {
		st := c.rn.BasicStatus()
		term := st.GetTerm()
		for _, en := range rd.Entries {
			if t := en.GetType(); t == raftpb.EntryConfChange || t == raftpb.EntryConfChangeV2 {
				c.confIndex = en.GetIndex()
			}
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
	var replicating []uint64
	confSent := false
	for _, m := range rd.Messages {
		if m.GetType() == raftpb.MsgApp && len(m.GetEntries()) == 0 && c.isLeader.Load() {
			if c.confIndex != 0 && m.GetCommit() >= c.confIndex {
				confSent = true
			} else {
				if replicating == nil {
					replicating = c.replicatingPeers()
				}
				if slices.Contains(replicating, m.GetTo()) && !slices.Contains(c.beatResp, m.GetTo()) {
					continue // only a commit index: the next heartbeat carries it
				}
			}
		}
		switch m.GetTo() {
		case raft.LocalAppendThread:
			c.submitAppend(m)
		case raft.LocalApplyThread:
			c.noteCommitted(m.GetEntries())
			c.pushApply(applyItem{m: m})
		default:
			if m.GetType() == raftpb.MsgTimeoutNow {
				// Leadership is being handed over: the target may win an
				// election at once, so the lease is void from now on.
				c.leaseUntil = time.Time{}
				c.lease.Store(nil)
				c.transferTerm = m.GetTerm()
			}
			c.send(m)
		}
	}
	if confSent {
		c.confIndex = 0
	}
}
