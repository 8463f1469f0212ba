package ops

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// Reasons a copyset is not healthy. They are stable identifiers in JSON
// output (docs/ops.md).
const (
	// No leader: none reported, the reported one is offline, not a member
	// or has not reported for a long time; or the replicas disagree.
	reasonNoLeader = "no_leader"
	// A member chunkserver is offline or unknown to the MDS.
	reasonPeersOffline = "peers_offline"
	// Fewer members than the pool's replicas, or the leader does not hear
	// from a member.
	reasonUnderReplicated = "under_replicated"
	// A member's log is further behind the leader's than the allowed gap.
	reasonLogGap = "log_gap"
	// A member is receiving a snapshot from the leader.
	reasonInstallingSnapshot = "installing_snapshot"
	// A member chunkserver did not answer (check copyset only).
	reasonReplicaUnreachable = "replica_unreachable"
	// A member chunkserver does not host the copyset (check copyset only).
	reasonReplicaMissing = "replica_missing"
	// Replicas disagree on the configuration (conf epoch or members), or a
	// replica's members differ from the MDS's record (check copyset only).
	reasonConfMismatch = "conf_mismatch"
)

// health collects the reasons and the sentences that explain them.
type health struct {
	reasons  []string
	problems []string
}

func (h *health) add(reason, format string, args ...any) {
	if !slices.Contains(h.reasons, reason) {
		h.reasons = append(h.reasons, reason)
	}
	h.problems = append(h.problems, fmt.Sprintf(format, args...))
}

func (h *health) ok() bool { return len(h.reasons) == 0 }

// healthParams are the thresholds of the copyset checks.
type healthParams struct {
	// maxLogGap is how many entries a member may trail the leader by.
	maxLogGap uint64
	// staleAfter is how old a leader's last report may be.
	staleAfter time.Duration
	now        time.Time
}

// silent reports whether a copyset's leader has not heard from a voting
// member for longer than copysetpb.PeerSilenceLimit. Raft's RecentActive
// is not used: every quorum check clears it, so a sample reads false for
// healthy members now and then.
func silent(pr *copysetpb.PeerProgress) bool {
	return !pr.Learner && pr.Silence() > copysetpb.PeerSilenceLimit
}

// csName names a chunkserver in problem sentences.
func csName(id uint64, byID map[uint64]*mdspb.ChunkServer) string {
	if cs := byID[id]; cs != nil && cs.Address != "" {
		return fmt.Sprintf("chunkserver %d (%s)", id, cs.Address)
	}
	return fmt.Sprintf("chunkserver %d", id)
}

// mdsCopysetHealth classifies a copyset from the MDS's record of it: the
// membership, the online state of the members and what its leader last
// reported (applied index and each follower's replication progress).
func mdsCopysetHealth(c *mdspb.Copyset, replicas uint32, byID map[uint64]*mdspb.ChunkServer, p healthParams) *health {
	h := &health{}
	if replicas == 0 {
		replicas = 3
	}
	down := map[uint64]bool{}
	for _, peer := range c.Peers {
		cs := byID[peer.ChunkserverId]
		switch {
		case cs == nil:
			down[peer.ChunkserverId] = true
			h.add(reasonPeersOffline, "member chunkserver %d is not registered", peer.ChunkserverId)
		case cs.OnlineState == mdspb.OnlineState_ONLINE_STATE_OFFLINE:
			down[peer.ChunkserverId] = true
			h.add(reasonPeersOffline, "member %s is offline", csName(peer.ChunkserverId, byID))
		}
	}
	if n := uint32(len(c.Peers)); n < replicas {
		h.add(reasonUnderReplicated, "%d of %d replicas", n, replicas)
	}
	leaderUsable := false
	switch {
	case c.LeaderId == 0:
		h.add(reasonNoLeader, "no leader has reported")
	case down[c.LeaderId]:
		h.add(reasonNoLeader, "leader %s is offline", csName(c.LeaderId, byID))
	case !slices.ContainsFunc(c.Peers, func(pe *commonpb.Peer) bool { return pe.ChunkserverId == c.LeaderId }):
		h.add(reasonNoLeader, "reported leader %s is not a member", csName(c.LeaderId, byID))
	case p.staleAfter > 0 && c.ReportedUnix > 0 && p.now.Sub(time.Unix(c.ReportedUnix, 0)) > p.staleAfter:
		h.add(reasonNoLeader, "leader %s last reported %s ago", csName(c.LeaderId, byID),
			p.now.Sub(time.Unix(c.ReportedUnix, 0)).Truncate(time.Second))
	default:
		leaderUsable = true
	}
	if !leaderUsable {
		return h
	}
	for _, pr := range c.Progress {
		if pr.ChunkserverId == c.LeaderId || down[pr.ChunkserverId] {
			continue
		}
		name := csName(pr.ChunkserverId, byID)
		if silent(pr) {
			h.add(reasonUnderReplicated, "leader has not heard from %s for %s", name, pr.Silence().Truncate(time.Second))
		}
		if strings.Contains(strings.ToLower(pr.State), "snapshot") {
			h.add(reasonInstallingSnapshot, "%s is receiving a snapshot", name)
		} else if c.AppliedIndex > pr.MatchIndex && c.AppliedIndex-pr.MatchIndex > p.maxLogGap {
			h.add(reasonLogGap, "%s is %d entries behind the leader (allowed %d)", name, c.AppliedIndex-pr.MatchIndex, p.maxLogGap)
		}
	}
	return h
}
