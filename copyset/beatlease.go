package copyset

import (
	"encoding/binary"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/quorum"
	"go.etcd.io/raft/v3/raftpb"
)

// The read lease of a quiesced leader.
//
// A leader holds its read lease (read.go) for leaseDuration after a round
// of heartbeats that a quorum answered, counted from when the round was
// sent. Awake, those rounds are Raft's ReadIndex rounds. A quiesced leader
// still sends its followers a quiesce heartbeat every IdleBeatTicks, and
// those rounds confirm the lease as well: each carries a sequence number in
// its context, which the answers echo (Raft answers a heartbeat with its
// context), so that an answer confirms the round it answers and never a
// later one. Once a quorum answered round s, the lease runs until s was
// sent plus leaseDuration, as after a ReadIndex round: a follower that
// answered refuses other candidates for an election timeout after it (a
// quiesced follower does not tick, and wakes with its election clock run
// forward only by the time since it last heard from its leader).
//
// With a round every half election timeout and a lease of the election
// timeout less two ticks, the lease of a group whose followers answer never
// lapses: reads of a quiesced group are served under it without waking the
// group, and a group that only serves reads quiesces like an idle one. A
// read that reaches the Raft worker in the last quarter of the lease (a
// round went unanswered, or its answers are late) sends a round out of
// turn; one that finds the lease lapsed wakes the group and confirms the
// leader with ReadIndex.

// beatSlots is how many of the last rounds sent a leader remembers; answers
// to older ones confirm nothing.
const beatSlots = 4

// beatLease is a quiesced leader's record of its rounds of quiesce
// heartbeats and their answers. Raft worker only.
type beatLease struct {
	seq       uint64              // the last round sent
	sent      [beatSlots]beatSent // the last rounds sent, at seq % beatSlots
	acked     map[uint64]uint64   // follower -> the last round it answered
	renewedAt time.Time           // when a read last sent a round out of turn
}

// beatSent is one round of quiesce heartbeats: its sequence number, the
// leader's term and when it was sent.
type beatSent struct {
	seq, term uint64
	at        time.Time
}

// isQuiesceBeat tells a quiesce heartbeat or its answer.
func isQuiesceBeat(m *raftpb.Message) bool {
	t := m.GetType()
	ctx := m.GetContext()
	return (t == raftpb.MsgHeartbeat || t == raftpb.MsgHeartbeatResp) &&
		len(ctx) >= len(quiesceContext) && string(ctx[:len(quiesceContext)]) == quiesceContext
}

// beatContext starts a round of quiesce heartbeats in term: the context
// its heartbeats carry.
func (c *Copyset) beatContext(term uint64) []byte {
	b := &c.beatLease
	b.seq++
	b.sent[b.seq%beatSlots] = beatSent{seq: b.seq, term: term, at: c.e.now()}
	return binary.LittleEndian.AppendUint64([]byte(quiesceContext), b.seq)
}

// beatSeq reads the round a quiesce heartbeat's answer answers.
func beatSeq(ctx []byte) (uint64, bool) {
	if len(ctx) != len(quiesceContext)+8 {
		return 0, false
	}
	return binary.LittleEndian.Uint64(ctx[len(quiesceContext):]), true
}

// noteBeatAnswer counts the answer to a quiesce heartbeat, before it is
// stepped: toward the follower's liveness (idleBeatRound) and toward the
// read lease of the round it answers. Raft reads a heartbeat answer's
// context as a count of confirmed reads: the marker is removed.
func (c *Copyset) noteBeatAnswer(m *raftpb.Message) {
	from := m.GetFrom()
	c.beatAcks[from] = c.beatRound
	seq, ok := beatSeq(m.GetContext())
	m.Context = nil
	b := &c.beatLease
	st := c.rn.BasicStatus()
	if !ok || st.RaftState != raft.StateLeader || m.GetTerm() != st.GetTerm() || seq <= b.acked[from] {
		return
	}
	if b.acked == nil {
		b.acked = map[uint64]uint64{}
	}
	b.acked[from] = seq
	// The last round a quorum answered (the leader answers its own).
	q := uint64(c.rn.Status().Config.Voters.CommittedIndex(beatAnswers{lease: b, self: c.e.cfg.NodeID}))
	round := b.sent[q%beatSlots]
	if q == 0 || round.seq != q || round.term != st.GetTerm() || st.LeadTransferee != 0 {
		return
	}
	if until := round.at.Add(c.leaseDuration()); until.After(c.leaseUntil) {
		c.leaseUntil = until
		c.publishLease(st, c.e.now())
	}
}

// renewByBeats sends a quiesced leader's round of quiesce heartbeats out of
// turn, for a read that found the lease near its end; at most one every
// quarter of a lease.
func (c *Copyset) renewByBeats(now time.Time) {
	if now.Sub(c.beatLease.renewedAt) < c.leaseDuration()/4 {
		return
	}
	c.beatLease.renewedAt = now
	st := c.rn.BasicStatus()
	c.sendQuiesceBeats(st.GetTerm(), st.GetCommit())
}

// beatAnswers gives Raft's quorum arithmetic the last round each voter
// answered, the leader's own being the last it sent.
type beatAnswers struct {
	lease *beatLease
	self  uint64
}

// AckedIndex implements quorum.AckedIndexer.
func (a beatAnswers) AckedIndex(id uint64) (quorum.Index, bool) {
	if id == a.self {
		return quorum.Index(a.lease.seq), true
	}
	seq, ok := a.lease.acked[id]
	return quorum.Index(seq), ok
}
