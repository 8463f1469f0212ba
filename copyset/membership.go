package copyset

import (
	"context"
	"fmt"
	"slices"
	"time"

	"go.etcd.io/raft/v3/raftpb"
)

// Membership changes come from the MDS as operators naming the configuration
// epoch they were computed against; a change is refused (ErrStaleEpoch) if
// the copyset's configuration moved since. They run on the leader.

// AddPeer adds node to the copyset as a voting member: first as a learner,
// which receives a snapshot and the log without counting toward quorums,
// then, once it has caught up with the leader, promoted to voter. The new
// replica must exist on its chunkserver (created empty, without peers).
func (c *Copyset) AddPeer(ctx context.Context, node, epoch uint64) error {
	if err := c.checkEpoch(epoch); err != nil {
		return err
	}
	cs := c.ConfState()
	if slices.Contains(cs.GetVoters(), node) {
		return nil
	}
	if !slices.Contains(cs.GetLearners(), node) {
		if err := c.changeConf(ctx, raftpb.ConfChangeAddLearnerNode, node, "add"); err != nil {
			return fmt.Errorf("add learner %d: %w", node, err)
		}
	}
	if err := c.waitCaughtUp(ctx, node); err != nil {
		return fmt.Errorf("catch up learner %d: %w", node, err)
	}
	if err := c.changeConf(ctx, raftpb.ConfChangeAddNode, node, "add"); err != nil {
		return fmt.Errorf("promote learner %d: %w", node, err)
	}
	return nil
}

// RemovePeer removes node from the copyset.
func (c *Copyset) RemovePeer(ctx context.Context, node, epoch uint64) error {
	if err := c.checkEpoch(epoch); err != nil {
		return err
	}
	if node == c.e.cfg.NodeID {
		return fmt.Errorf("copyset %s: remove %d: the leader does not remove itself; transfer leadership first", c.id, node)
	}
	cs := c.ConfState()
	if !slices.Contains(cs.GetVoters(), node) && !slices.Contains(cs.GetLearners(), node) {
		return nil
	}
	if err := c.changeConf(ctx, raftpb.ConfChangeRemoveNode, node, "remove"); err != nil {
		return fmt.Errorf("remove %d: %w", node, err)
	}
	return nil
}

// TransferLeader hands leadership to node and waits until node leads or ctx
// ends. The caller's read lease ends at once.
func (c *Copyset) TransferLeader(ctx context.Context, node, epoch uint64) error {
	if err := c.checkEpoch(epoch); err != nil {
		return err
	}
	if !slices.Contains(c.ConfState().GetVoters(), node) {
		return fmt.Errorf("copyset %s: transfer leader: %d is not a voting member", c.id, node)
	}
	if err := c.callWait(ctx, func() { c.rn.TransferLeader(node) }); err != nil {
		return err
	}
	asked := time.Now()
	for c.Leader() != node {
		select {
		case <-ctx.Done():
			return fmt.Errorf("copyset %s: leadership did not move to %d: %w", c.id, node, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
		switch lead := c.Leader(); {
		case lead != c.e.cfg.NodeID && lead != node && lead != 0:
			return fmt.Errorf("copyset %s: leadership moved to %d instead of %d", c.id, lead, node)
		case lead == c.e.cfg.NodeID && time.Since(asked) > c.e.electionTimeout():
			// Raft gives a transfer up after an election timeout (the
			// target did not catch up in time): ask again.
			if err := c.callWait(ctx, func() { c.rn.TransferLeader(node) }); err != nil {
				return err
			}
			asked = time.Now()
		}
	}
	return nil
}

func (c *Copyset) checkEpoch(epoch uint64) error {
	if !c.isLeader.Load() {
		return &NotLeaderError{Leader: c.leader.Load()}
	}
	if cur := c.confEpoch.Load(); cur != epoch {
		return fmt.Errorf("%w: copyset %s is at epoch %d, operator named %d", ErrStaleEpoch, c.id, cur, epoch)
	}
	return nil
}

// changeConf proposes one membership change and waits until it is applied.
func (c *Copyset) changeConf(ctx context.Context, typ raftpb.ConfChangeType, node uint64, kind string) error {
	before := c.confEpoch.Load()
	var perr error
	err := c.callWait(ctx, func() {
		switch {
		case !c.isLeader.Load():
			perr = &NotLeaderError{Leader: c.leader.Load()}
		case c.pending != nil || c.termStart == 0 || c.applied.Load() < c.termStart:
			// Raft takes one membership change at a time, and a new leader
			// none before its first entry is applied.
			perr = ErrConfChangeInProgress
		default:
			cc := &raftpb.ConfChangeV2{Changes: []*raftpb.ConfChangeSingle{{Type: &typ, NodeId: &node}}}
			if perr = c.rn.ProposeConfChange(cc); perr == nil {
				c.pending = &PendingChange{Kind: kind, Node: node}
			}
		}
	})
	if err != nil {
		return err
	}
	if perr != nil {
		return perr
	}
	defer c.call(func() { c.pending = nil })
	for {
		if c.confEpoch.Load() > before && c.confHas(typ, node) {
			return nil
		}
		if !c.isLeader.Load() {
			return &NotLeaderError{Leader: c.leader.Load()}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (c *Copyset) confHas(typ raftpb.ConfChangeType, node uint64) bool {
	cs := c.ConfState()
	switch typ {
	case raftpb.ConfChangeAddLearnerNode:
		return slices.Contains(cs.GetLearners(), node)
	case raftpb.ConfChangeAddNode:
		return slices.Contains(cs.GetVoters(), node)
	case raftpb.ConfChangeRemoveNode:
		return !slices.Contains(cs.GetVoters(), node) && !slices.Contains(cs.GetLearners(), node)
	}
	return false
}

// waitCaughtUp waits until the leader's match index for node reaches the
// commit index the leader had when the wait began.
func (c *Copyset) waitCaughtUp(ctx context.Context, node uint64) error {
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	target := st.Commit
	for {
		st, err := c.Status(ctx)
		if err != nil {
			return err
		}
		if st.Role != RoleLeader {
			return &NotLeaderError{Leader: st.Leader}
		}
		for _, p := range st.Progress {
			if p.Node == node && p.Match >= target {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
