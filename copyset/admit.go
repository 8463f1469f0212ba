package copyset

import (
	"fmt"
	"runtime/debug"
	"time"

	"go.etcd.io/raft/v3/raftpb"
)

// Raft messages from the network are checked before Raft sees them: Raft
// trusts its peers and panics on messages no correct peer sends (a
// heartbeat committing past the end of the log, an append answer
// acknowledging entries the leader never had, appended entries out of
// order). A message that fails a check is dropped and counted; the replica
// and the process go on. Who may send at all (the sender being a member of
// the copyset) is decided by the transport's authentication, not here: the
// sender's id in a message is whatever the sender wrote.

// networkTypes are the message types peers send each other. The others are
// local to a replica (ticks, storage acknowledgements, proposals, which are
// not forwarded) or arrive another way (snapshots, through the install
// stream).
var networkTypes = map[raftpb.MessageType]bool{
	raftpb.MsgApp: true, raftpb.MsgAppResp: true,
	raftpb.MsgVote: true, raftpb.MsgVoteResp: true,
	raftpb.MsgPreVote: true, raftpb.MsgPreVoteResp: true,
	raftpb.MsgHeartbeat: true, raftpb.MsgHeartbeatResp: true,
	raftpb.MsgTimeoutNow: true, raftpb.MsgTransferLeader: true,
	// Not MsgReadIndex or its answer: only leaders take read indexes here,
	// so no peer forwards one.
}

// maxTermLeap bounds how far past this replica's term a message's term may
// be: each election adds one, so no correct peer is 2^32 ahead, and a term
// near 2^64 would overflow in Raft's next campaign.
const maxTermLeap = 1 << 32

// MemberAnswer is what Config.Members says of a node.
type MemberAnswer int

// The answers of Config.Members.
const (
	// MemberYes: the node is a member (or membership cannot be learned,
	// and the message is taken rather than stall the copyset).
	MemberYes MemberAnswer = iota
	// MemberNo: the node is not a member of the copyset.
	MemberNo
	// MemberPending: not known yet; asked for.
	MemberPending
)

// setMembers records the configuration Raft runs with (Raft worker only).
func (c *Copyset) setMembers(cs *raftpb.ConfState) {
	m := map[uint64]bool{}
	for _, ids := range [][]uint64{cs.GetVoters(), cs.GetLearners(), cs.GetVotersOutgoing(), cs.GetLearnersNext()} {
		for _, id := range ids {
			m[id] = true
		}
	}
	if len(m) > 0 {
		c.members = m
	}
}

// checkMember refuses a message from a node that is not a member of the
// copyset: by this replica's configuration, or, when that does not name
// it (a replica that missed changes, or a new one that knows no
// configuration yet), by Config.Members.
func (c *Copyset) checkMember(m *raftpb.Message) error {
	from := m.GetFrom()
	if c.members[from] || c.e.cfg.Members == nil {
		return nil
	}
	switch c.e.cfg.Members(c.id, from) {
	case MemberNo:
		return fmt.Errorf("%s from %d, which is not a member of the copyset", m.GetType(), from)
	case MemberPending:
		return fmt.Errorf("%s from %d, not a member here; asking the MDS", m.GetType(), from)
	}
	return nil
}

// RefusedMessages is how many Raft messages from the network failed their
// checks since the engine started (a metric).
func (e *Engine) RefusedMessages() uint64 { return e.refused.Load() }

// admit checks a message from the network; it may lower a heartbeat's
// commit index to the end of the log. lastIndex is the index of the last
// entry in the replica's log (a lower bound of Raft's own, see logLast).
func (c *Copyset) admit(m *raftpb.Message, lastIndex uint64) error {
	t := m.GetType()
	switch {
	case !networkTypes[t]:
		return fmt.Errorf("%s is not a message peers send", t)
	case m.GetTo() != c.e.cfg.NodeID:
		return fmt.Errorf("%s addressed to %d, not this replica (%d)", t, m.GetTo(), c.e.cfg.NodeID)
	case m.GetFrom() == 0 || m.GetFrom() == c.e.cfg.NodeID:
		return fmt.Errorf("%s from %d", t, m.GetFrom())
	case m.GetSnapshot() != nil:
		return fmt.Errorf("%s carries a snapshot", t)
	case m.GetTerm() == 0:
		// Raft takes a message of term 0 for a local one and skips its
		// term checks.
		return fmt.Errorf("%s from %d has no term", t, m.GetFrom())
	case m.GetTerm() > c.term.Load()+maxTermLeap:
		return fmt.Errorf("%s from %d has term %d, far past this replica's %d", t, m.GetFrom(), m.GetTerm(), c.term.Load())
	}
	if err := c.checkMember(m); err != nil {
		return err
	}
	switch t {
	case raftpb.MsgHeartbeat:
		// A leader commits on a follower only what the follower
		// acknowledged (after that was durable, so after lastIndex took
		// it in). A commit past the log commits nothing: commits never go
		// back, and the heartbeat's context (read confirmation) still
		// counts.
		if m.GetCommit() > lastIndex {
			m.Commit = new(uint64(0))
		}
	case raftpb.MsgApp:
		for i, e := range m.GetEntries() {
			if e.GetIndex() != m.GetIndex()+1+uint64(i) {
				return fmt.Errorf("%s from %d: entry %d has index %d after index %d", t, m.GetFrom(), i, e.GetIndex(), m.GetIndex())
			}
			if e.GetTerm() < m.GetLogTerm() || e.GetTerm() > m.GetTerm() {
				return fmt.Errorf("%s from %d: entry %d has term %d outside %d..%d", t, m.GetFrom(), e.GetIndex(), e.GetTerm(), m.GetLogTerm(), m.GetTerm())
			}
		}
	case raftpb.MsgAppResp:
		// Only entries this leader sent can be acknowledged.
		if m.GetIndex() > lastIndex || m.GetRejectHint() > lastIndex && m.GetReject() {
			return fmt.Errorf("%s from %d acknowledges index %d (hint %d) past the end of the log (%d)",
				t, m.GetFrom(), m.GetIndex(), m.GetRejectHint(), lastIndex)
		}
	}
	return nil
}

// refuse drops a message that failed admit, logging at most once a second
// per replica.
func (c *Copyset) refuse(m *raftpb.Message, err error) {
	c.e.refused.Add(1)
	if now := c.e.now(); now.Sub(c.refusedLogged) >= time.Second {
		c.refusedLogged = now
		c.log.Warn("raft message refused", "from", m.GetFrom(), "type", m.GetType().String(), "err", err)
	}
}

// step hands a message to Raft. Raft panics on input it cannot handle; a
// panic that admit did not foresee takes this replica out of service (its
// peers go on, the MDS replaces it), never the process.
// It reports false when the replica failed so.
func (c *Copyset) step(m *raftpb.Message) (ok bool) {
	defer func() {
		if r := recover(); r != nil {
			c.fail(fmt.Errorf("raft panicked on a %s from %d: %v\n%s", m.GetType(), m.GetFrom(), r, debug.Stack()))
			ok = false
		}
	}()
	_ = c.rn.Step(m)
	return true
}
