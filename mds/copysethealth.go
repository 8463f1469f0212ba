package mds

import (
	"slices"
	"strings"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// The reasons a copyset is unhealthy, judged from what its leader last
// reported. They are the reasons of cairn-ops status (docs/ops.md), which
// judges from the same records, and the values of cairn_mds_copysets'
// health label.
const (
	// healthNoLeader: no leader reported, the reported one is offline (or
	// not registered) or not a member, or its last report is older than
	// leaderStaleAfter.
	healthNoLeader = "no_leader"
	// healthPeersOffline: a member chunkserver is OFFLINE or not
	// registered.
	healthPeersOffline = "peers_offline"
	// healthUnderReplicated: fewer members than the pool's replicas, or
	// the leader has not heard from a voting member for longer than
	// copysetpb.PeerSilenceLimit.
	healthUnderReplicated = "under_replicated"
	// healthLogGap: a follower's match index trails the leader's applied
	// index by more than maxLogGap entries.
	healthLogGap = "log_gap"
	// healthInstallingSnapshot: the leader is sending a follower a
	// snapshot.
	healthInstallingSnapshot = "installing_snapshot"
)

// healthHealthy is cairn_mds_copysets' health label of copysets with no
// reason to be unhealthy.
const healthHealthy = "healthy"

// healthReasons lists every reason, in the order they are judged.
var healthReasons = []string{healthNoLeader, healthPeersOffline, healthUnderReplicated, healthLogGap, healthInstallingSnapshot}

// Thresholds of the judgement: the defaults of cairn-ops status's
// --stale-after and --max-log-gap, so that the metric and the command agree.
const (
	leaderStaleAfter = 30 * time.Second
	maxLogGap        = 1000
)

// copysetHealth is what the MDS knows of a copyset's health.
type copysetHealth struct {
	// allocatable: no member OFFLINE (or unregistered) and all the pool's
	// replicas; a copyset with no leader reported yet is allocatable.
	allocatable bool
	// reasons it is unhealthy, each at most once, in healthReasons' order;
	// none when healthy.
	reasons []string
}

func (h *copysetHealth) add(reason string) {
	if !slices.Contains(h.reasons, reason) {
		h.reasons = append(h.reasons, reason)
	}
}

// copysetHealthLocked classifies a copyset for allocation and metrics.
func (l *leaderState) copysetHealthLocked(c *mdspb.Copyset, now time.Time) copysetHealth {
	replicas := uint32(3)
	if p := l.mu.logicalPools[c.Id.GetLogicalPoolId()]; p != nil && p.Replicas != 0 {
		replicas = p.Replicas
	}
	down := func(id uint64) bool {
		e := l.mu.chunkServers[id]
		return e == nil || l.onlineStateLocked(e, now) == mdspb.OnlineState_ONLINE_STATE_OFFLINE
	}
	return classifyCopyset(c, replicas, down, now)
}

// classifyCopyset judges c from its record: down tells a member that is
// OFFLINE or not registered. The judgement is cairn-ops status's (its
// mdsCopysetHealth), with its default thresholds.
func classifyCopyset(c *mdspb.Copyset, replicas uint32, down func(id uint64) bool, now time.Time) copysetHealth {
	var h copysetHealth
	offline := map[uint64]bool{}
	for _, p := range c.Peers {
		if down(p.ChunkserverId) {
			offline[p.ChunkserverId] = true
		}
	}
	h.allocatable = len(offline) == 0 && uint32(len(c.Peers)) >= replicas
	leaderUsable := false
	switch {
	case c.LeaderId == 0, down(c.LeaderId):
		h.add(healthNoLeader)
	case !slices.ContainsFunc(c.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == c.LeaderId }):
		h.add(healthNoLeader)
	case c.ReportedUnix > 0 && now.Sub(time.Unix(c.ReportedUnix, 0)) > leaderStaleAfter:
		h.add(healthNoLeader)
	default:
		leaderUsable = true
	}
	if len(offline) > 0 {
		h.add(healthPeersOffline)
	}
	if uint32(len(c.Peers)) < replicas {
		h.add(healthUnderReplicated)
	}
	if leaderUsable {
		for _, pr := range c.Progress {
			if pr.ChunkserverId == c.LeaderId || offline[pr.ChunkserverId] {
				continue
			}
			if !pr.Learner && pr.Silence() > copysetpb.PeerSilenceLimit {
				h.add(healthUnderReplicated)
			}
			if strings.Contains(strings.ToLower(pr.State), "snapshot") {
				h.add(healthInstallingSnapshot)
			} else if c.AppliedIndex > pr.MatchIndex && c.AppliedIndex-pr.MatchIndex > maxLogGap {
				h.add(healthLogGap)
			}
		}
	}
	slices.SortFunc(h.reasons, func(a, b string) int {
		return slices.Index(healthReasons, a) - slices.Index(healthReasons, b)
	})
	return h
}
