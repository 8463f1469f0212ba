package copyset

import (
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
)

// Quiescence: a copyset with nothing to do stops ticking.
//
// A Raft group ticks ten times a second and its leader heartbeats every
// follower at each tick, written or not; a chunkserver with a thousand
// replicas spent a third of a core on that alone. Once a leader has seen
// nothing but heartbeats for QuiesceTicks, with every follower caught up
// and everything applied, it sends each follower a quiesce heartbeat (a
// MsgHeartbeat whose context is quiesceContext) and stops ticking; a
// follower that gets one from its leader stops too. A quiesced group costs
// one quiesce heartbeat per follower every IdleBeatTicks, sent by the
// leader, and a counter the ticker increments.
//
// Anything else wakes a group on the spot: a proposal, a call, any message
// other than quiesce heartbeats and their answers. Raft then runs as before.
// Reads do not wake it: the answers to the quiesce heartbeats keep the
// leader's read lease (beatlease.go), and only a read that finds the lease
// lapsed wakes the group to confirm the leader with ReadIndex.
//
// Failure detection: a quiesced follower that has heard no quiesce
// heartbeat for an election timeout and two ticks (two beats lost) wakes
// with its election clock run forward by the time since it last heard from
// its leader, so that its designated successor campaigns at once (a leader
// that died, a replica that failed): the same 1.2 s as for a group at work.
// That is safe for the leader's read lease, which is shorter than one
// election timeout since the leader's last confirmed round. A quiesced leader wakes when a follower stops answering
// its quiesce heartbeats for two election timeouts.
//
// A quiesce heartbeat's context is quiesceContext followed by the round's
// sequence number (beatContext).
const quiesceContext = "quiesce"

// Quiesced tells whether the replica has stopped ticking because its group
// is idle.
func (c *Copyset) Quiesced() bool { return c.quiesced.Load() }

// quiesceEnabled tells whether the engine quiesces idle groups: not with
// manual ticks, where tests drive Raft's clock themselves (unless they ask).
func (e *Engine) quiesceEnabled() bool {
	k := e.cfg.TestingKnobs
	return e.cfg.QuiesceTicks > 0 && (!k.ManualTicks || k.QuiesceManualTicks)
}

// tickQuiesced is the ticker's work for a quiesced copyset instead of a Raft
// tick: count, have the leader send its idle heartbeat every IdleBeatTicks,
// and wake a follower whose leader went silent. It must not block.
func (c *Copyset) tickQuiesced() {
	n := c.quietTicks.Add(1)
	switch {
	case c.isLeader.Load():
		if n%int64(c.e.cfg.IdleBeatTicks) == 0 {
			c.enqueue(func(in *inbox) { in.idleBeat = true })
		}
	case n >= int64(c.e.cfg.ElectionTicks+campaignMarginTicks):
		c.enqueue(func(in *inbox) { in.wake = true })
	}
}

// active tells whether an inbox holds work: anything but ticks, reads,
// quiet calls, quiescence bookkeeping and heartbeats. It wakes a quiesced
// group and restarts a leader's count of idle ticks. (A read wakes a
// quiesced group only when its lease lapsed: see startReads.)
func (in *inbox) active() bool {
	if len(in.props) > 0 || len(in.calls) > 0 || len(in.local) > 0 || len(in.appended) > 0 || in.wake {
		return true
	}
	for _, m := range in.msgs {
		if t := m.GetType(); t != raftpb.MsgHeartbeat && t != raftpb.MsgHeartbeatResp {
			return true
		}
	}
	return false
}

// noteQuiet runs on the Raft worker after the inbox's messages were
// stepped and before its Ready is handled: it wakes the group on work (a
// follower also on a heartbeat of a leader that is awake), puts a follower
// to sleep on its leader's quiesce heartbeat, sends a quiesced leader's
// idle heartbeats and quiesces a leader idle for QuiesceTicks.
func (c *Copyset) noteQuiet(in *inbox) {
	if !c.e.quiesceEnabled() {
		return
	}
	active := in.active()
	if active {
		if in.wake && c.quiesced.Load() {
			c.wakeForward()
		}
		c.quiesced.Store(false)
		c.idleTicks = 0
	}
	lead := c.rn.BasicStatus().Lead
	for _, m := range in.msgs {
		switch {
		case m.GetType() != raftpb.MsgHeartbeat || m.GetFrom() != lead || c.isLeader.Load():
			// Answers to quiesce heartbeats were counted as they were
			// stepped (process).
		case !isQuiesceBeat(m):
			c.quiesced.Store(false) // the leader is awake
		case !active:
			c.quiesced.Store(true)
			c.quietTicks.Store(0)
		}
	}
	if in.idleBeat && c.quiesced.Load() && c.isLeader.Load() {
		c.idleBeatRound()
	}
	if in.ticks > 0 && c.isLeader.Load() && !c.quiesced.Load() {
		c.idleTicks += in.ticks
		if c.idleTicks >= c.e.cfg.QuiesceTicks {
			c.maybeQuiesce()
		}
	}
}

// wakeForward wakes a follower whose quiesced leader went silent, with its
// election clock run forward by the time since it last heard from the
// leader (up to an election timeout), so that Raft lets it vote for another
// candidate and its designated successor campaigns at once (see
// maybeCampaign).
//
// The clock runs forward by the time that really passed, never by a fixed
// election timeout: the wake was queued by a tick that saw the follower
// quiesced, and the leader's own heartbeat may have been stepped in the
// same round (the leader woke for a read and confirms its lease with it).
// A follower that acknowledged that heartbeat must refuse other candidates
// for an election timeout after it, as the lease assumes.
func (c *Copyset) wakeForward() {
	if c.isLeader.Load() {
		return
	}
	lead := c.rn.BasicStatus().Lead
	silent := c.e.cfg.ElectionTicks + campaignMarginTicks
	if at, ok := c.heard[lead]; ok && lead != 0 {
		silent = min(silent, int(max(c.e.now().Sub(at), 0)/c.e.cfg.TickInterval))
	}
	if silent < c.e.cfg.ElectionTicks {
		c.log.Info("quiesced copyset woke; its leader was heard from since", "leader", lead, "silent_ticks", silent)
	} else {
		c.log.Info("quiesced copyset heard nothing from its leader for an election timeout; waking", "leader", lead)
	}
	for range min(silent, c.e.cfg.ElectionTicks) {
		c.rn.Tick()
	}
	c.silentTicks = silent
	c.maybeCampaign()
}

// maybeQuiesce quiesces an idle leader whose followers are all caught up and
// answering: it sends them quiesce heartbeats and stops ticking.
func (c *Copyset) maybeQuiesce() {
	st := c.rn.Status()
	if st.RaftState != raft.StateLeader || st.LeadTransferee != 0 || c.pending != nil ||
		len(c.readBatches) > 0 || len(c.snapSending) > 0 || c.termStart == 0 || len(st.Config.Learners) > 0 {
		return
	}
	last, err := c.storage.LastIndex()
	if err != nil || st.GetCommit() != last || c.applied.Load() != last {
		return
	}
	c.wmu.Lock()
	busy := len(c.waiters) > 0
	c.wmu.Unlock()
	if busy {
		return
	}
	for _, pr := range st.Progress { // the leader's own too: its append is durable
		if pr.Match != last || pr.State != tracker.StateReplicate || !pr.RecentActive {
			return
		}
	}
	c.quiesced.Store(true)
	c.quietTicks.Store(0)
	c.beatAcks = map[uint64]uint64{}
	c.beatRound = 0
	c.sendQuiesceBeats(st.GetTerm(), st.GetCommit())
}

// idleBeatRound sends a quiesced leader's periodic quiesce heartbeats, or
// wakes it when a follower left the last two election timeouts' rounds
// unanswered. It runs every IdleBeatTicks on every quiesced leader, so it
// reads Raft's state without copying it (BasicStatus, WithProgress).
func (c *Copyset) idleBeatRound() {
	st := c.rn.BasicStatus()
	if st.RaftState != raft.StateLeader {
		c.quiesced.Store(false)
		return
	}
	rounds := uint64(max(2*c.e.cfg.ElectionTicks/c.e.cfg.IdleBeatTicks, 1))
	c.beatRound++
	silent := uint64(0)
	c.rn.WithProgress(func(id uint64, _ raft.ProgressType, _ tracker.Progress) {
		if id != c.e.cfg.NodeID && c.beatRound > rounds && c.beatAcks[id]+rounds < c.beatRound {
			silent = id
		}
	})
	if silent != 0 {
		c.log.Info("a follower of a quiesced copyset stopped answering; waking", "follower", silent)
		c.quiesced.Store(false)
		c.idleTicks = 0
		return
	}
	c.sendQuiesceBeats(st.GetTerm(), st.GetCommit())
}

// sendQuiesceBeats sends every follower a quiesce heartbeat of the current
// term, with a commit index the follower holds (as Raft's own heartbeats),
// as one round of the read lease (beatContext).
func (c *Copyset) sendQuiesceBeats(term, committed uint64) {
	typ := raftpb.MsgHeartbeat
	from := c.e.cfg.NodeID
	ctx := c.beatContext(term)
	c.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
		if id == from {
			return
		}
		to, commit := id, min(pr.Match, committed)
		c.send(&raftpb.Message{Type: &typ, To: &to, From: &from, Term: &term, Commit: &commit, Context: ctx})
	})
}
