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
	// findings are the problems with what each is about, for status to
	// group them by cause.
	findings []finding
}

// finding is one thing wrong with a copyset: its reason, its sentence, and
// the chunkserver it is about, so that what one chunkserver does to many
// copysets reads as one cause.
type finding struct {
	reason string
	text   string
	// cs is the chunkserver the finding is about; 0 when it is about the
	// copyset itself (no leader has reported, too few members).
	cs uint64
	// silence is how long the leader has not heard from cs, and behind how
	// many entries cs trails the leader: figures that differ from copyset
	// to copyset for one cause, of which a cause shows the largest.
	silence time.Duration
	behind  uint64
}

// add records a finding about the copyset itself.
func (h *health) add(reason, format string, args ...any) {
	h.note(finding{reason: reason}, format, args...)
}

// note records f with its sentence.
func (h *health) note(f finding, format string, args ...any) {
	if !slices.Contains(h.reasons, f.reason) {
		h.reasons = append(h.reasons, f.reason)
	}
	f.text = fmt.Sprintf(format, args...)
	h.problems = append(h.problems, f.text)
	h.findings = append(h.findings, f)
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
			h.note(finding{reason: reasonPeersOffline, cs: peer.ChunkserverId}, "member chunkserver %d is not registered", peer.ChunkserverId)
		case cs.OnlineState == mdspb.OnlineState_ONLINE_STATE_OFFLINE:
			down[peer.ChunkserverId] = true
			h.note(finding{reason: reasonPeersOffline, cs: peer.ChunkserverId}, "member %s is offline", csName(peer.ChunkserverId, byID))
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
		h.note(finding{reason: reasonNoLeader, cs: c.LeaderId}, "leader %s is offline", csName(c.LeaderId, byID))
	case !slices.ContainsFunc(c.Peers, func(pe *commonpb.Peer) bool { return pe.ChunkserverId == c.LeaderId }):
		h.add(reasonNoLeader, "reported leader %s is not a member", csName(c.LeaderId, byID))
	case p.staleAfter > 0 && c.ReportedUnix > 0 && p.now.Sub(time.Unix(c.ReportedUnix, 0)) > p.staleAfter:
		h.note(finding{reason: reasonNoLeader, cs: c.LeaderId}, "leader %s last reported %s ago", csName(c.LeaderId, byID),
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
			h.note(finding{reason: reasonUnderReplicated, cs: pr.ChunkserverId, silence: pr.Silence()},
				"leader has not heard from %s for %s", name, pr.Silence().Truncate(time.Second))
		}
		if strings.Contains(strings.ToLower(pr.State), "snapshot") {
			h.note(finding{reason: reasonInstallingSnapshot, cs: pr.ChunkserverId}, "%s is receiving a snapshot", name)
		} else if c.AppliedIndex > pr.MatchIndex && c.AppliedIndex-pr.MatchIndex > p.maxLogGap {
			behind := c.AppliedIndex - pr.MatchIndex
			h.note(finding{reason: reasonLogGap, cs: pr.ChunkserverId, behind: behind}, "%s is %d entries behind the leader (allowed %d)", name, behind, p.maxLogGap)
		}
	}
	return h
}
