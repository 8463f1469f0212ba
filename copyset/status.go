package copyset

import (
	"context"
	"slices"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
)

// Role is a replica's Raft role.
type Role int

// Raft roles.
const (
	RoleFollower Role = iota
	RoleCandidate
	RolePreCandidate
	RoleLeader
	RoleLearner
)

func (r Role) String() string {
	return [...]string{"follower", "candidate", "pre-candidate", "leader", "learner"}[r]
}

// PeerProgress is the leader's view of a member's replication.
type PeerProgress struct {
	Node         uint64
	Match        uint64
	State        string // probe, replicate or snapshot
	RecentActive bool
	Learner      bool
	// Silent is how long ago the leader last heard from the peer (since
	// it became leader, if not yet).
	Silent time.Duration
}

// PendingChange is a membership change proposed by this replica and not yet
// applied.
type PendingChange struct {
	Kind string // add, remove
	Node uint64
}

// Status is one replica's view of its copyset.
type Status struct {
	ID                 GroupID
	Node               uint64
	Role               Role
	Leader             uint64
	Voters, Learners   []uint64
	ConfEpoch          uint64
	Term, Commit       uint64
	Applied            uint64
	FirstIndex         uint64
	LastIndex          uint64
	Progress           []PeerProgress // leader only
	Pending            *PendingChange
	InstallingSnapshot bool
	Chunks             int
	ApplyErrors        uint64
	// Broken says why the replica stopped serving; empty while healthy.
	Broken string
}

// Status reports the replica's state; it waits for the Raft worker.
func (c *Copyset) Status(ctx context.Context) (Status, error) {
	if err := c.Broken(); err != nil {
		// The RawNode is no longer driven; report what is known.
		cs := c.ConfState()
		return Status{
			ID: c.id, Node: c.e.cfg.NodeID, Term: c.term.Load(), Applied: c.applied.Load(),
			ConfEpoch: c.confEpoch.Load(), Voters: append([]uint64(nil), cs.GetVoters()...),
			Learners: append([]uint64(nil), cs.GetLearners()...), ApplyErrors: c.applyErrs.Load(),
			Broken: err.Error(),
		}, nil
	}
	var st Status
	err := c.callQuietWait(ctx, func() {
		bs := c.rn.BasicStatus()
		st = Status{
			ID: c.id, Node: c.e.cfg.NodeID, Leader: bs.Lead,
			Term: bs.GetTerm(), Commit: bs.GetCommit(),
		}
		switch bs.RaftState {
		case raft.StateLeader:
			st.Role = RoleLeader
		case raft.StateCandidate:
			st.Role = RoleCandidate
		case raft.StatePreCandidate:
			st.Role = RolePreCandidate
		default:
			st.Role = RoleFollower
		}
		st.FirstIndex, _ = c.storage.FirstIndex()
		st.LastIndex, _ = c.storage.LastIndex()
		if bs.RaftState == raft.StateLeader {
			now := c.e.now()
			c.rn.WithProgress(func(id uint64, typ raft.ProgressType, pr tracker.Progress) {
				p := PeerProgress{
					Node: id, Match: pr.Match, State: pr.State.String(),
					RecentActive: pr.RecentActive || id == c.e.cfg.NodeID, Learner: pr.IsLearner,
				}
				if id != c.e.cfg.NodeID {
					heard := c.heard[id]
					if heard.Before(c.leadSince) {
						heard = c.leadSince
					}
					p.Silent = max(now.Sub(heard), 0)
				}
				st.Progress = append(st.Progress, p)
			})
			slices.SortFunc(st.Progress, func(a, b PeerProgress) int { return int(a.Node) - int(b.Node) })
		}
		if c.pending != nil {
			p := *c.pending
			st.Pending = &p
		}
	})
	if err != nil {
		return Status{}, err
	}
	cs := c.ConfState()
	st.Voters = append([]uint64(nil), cs.GetVoters()...)
	st.Learners = append([]uint64(nil), cs.GetLearners()...)
	if st.Role == RoleFollower && slices.Contains(st.Learners, st.Node) {
		st.Role = RoleLearner
	}
	st.ConfEpoch = c.confEpoch.Load()
	st.Applied = c.applied.Load()
	st.InstallingSnapshot = c.installing.Load()
	st.Chunks = len(c.store.List())
	st.ApplyErrors = c.applyErrs.Load()
	return st, nil
}

// ConfState returns the configuration of the applied state.
func (c *Copyset) ConfState() *raftpb.ConfState {
	c.smMu.Lock()
	defer c.smMu.Unlock()
	if c.sm.confState == nil {
		return &raftpb.ConfState{}
	}
	return c.sm.confState
}
