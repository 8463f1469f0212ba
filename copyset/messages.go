package copyset

import (
	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
)

// Which messages a write costs (docs/copyset.md, "Messages per write").

// replicatingPeers lists the followers the leader replicates to in
// pipeline (tracker.StateReplicate). An append without entries to one of
// them only tells it a new commit index, which Raft broadcasts after every
// commit: two messages and two answers per write. The leader's heartbeats
// (every HeartbeatTicks) and its next append carry the commit index as
// well, so such appends are not sent: a follower applies up to HeartbeatTicks
// later (more when a heartbeat is lost), and nothing waits for a follower to apply (reads are the leader's,
// and a new leader commits an entry of its own term before it serves).
//
// The commit of a membership change goes to every follower (confIndex):
// a follower the change removes hears no heartbeat once the leader applied
// it, and would never learn that it is out.
//
// An empty append also goes out to a follower being probed, and to one
// whose heartbeat answer Raft just stepped: Raft answers a heartbeat answer
// of a follower whose match is behind with an append, empty when its next
// index is past the log, and it is that append the follower rejects when
// it lost what was in flight to it, which starts the probe that repairs it.
func (c *Copyset) replicatingPeers() []uint64 {
	c.replicating = c.replicating[:0]
	c.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
		if id != c.e.cfg.NodeID && pr.State == tracker.StateReplicate {
			c.replicating = append(c.replicating, id)
		}
	})
	return c.replicating
}

// sendsDirect tells the responses of a durable append that the WAL's
// completion sends itself (see submitAppend).
func (c *Copyset) sendsDirect(r *raftpb.Message) bool {
	return r.GetTo() != c.e.cfg.NodeID && r.GetType() != raftpb.MsgSnap
}
