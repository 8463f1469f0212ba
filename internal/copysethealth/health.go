package copysethealth

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// Reasons a copyset is not healthy: stable identifiers, in JSON output and
// as the metric's label values (docs/ops.md).
const (
	// NoLeader: none reported, the reported one is offline, not a member
	// or has not reported for longer than Params.StaleAfter.
	NoLeader = "no_leader"
	// PeersOffline: a member chunkserver is offline or not registered.
	PeersOffline = "peers_offline"
	// UnderReplicated: fewer members than the pool's replicas, or the
	// leader has not heard from a voting member for longer than
	// copysetpb.PeerSilenceLimit.
	UnderReplicated = "under_replicated"
	// LogGap: a follower's match index trails the leader's applied index
	// by more than Params.MaxLogGap entries.
	LogGap = "log_gap"
	// InstallingSnapshot: the leader is sending a follower a snapshot.
	InstallingSnapshot = "installing_snapshot"
)

// Reasons lists every reason Judge gives, in a fixed order.
var Reasons = []string{NoLeader, PeersOffline, UnderReplicated, LogGap, InstallingSnapshot}

// Defaults of the thresholds: cairn-ops status's --stale-after and
// --max-log-gap, and what the MDS's metric judges with.
const (
	DefaultStaleAfter = 30 * time.Second
	DefaultMaxLogGap  = 1000
)

// Params are what a judgement needs beyond the copyset's record.
type Params struct {
	// Replicas is the pool's replica count (0: 3).
	Replicas uint32
	// MaxLogGap is how many entries a follower may trail the leader by;
	// StaleAfter how old a leader's last report may be (0: any age).
	MaxLogGap  uint64
	StaleAfter time.Duration
	Now        time.Time
	// Member tells whether a member chunkserver is registered and whether
	// it is offline.
	Member func(id uint64) (registered, offline bool)
	// Name names a chunkserver in the findings' sentences.
	Name func(id uint64) string
}

// Finding is one thing wrong with a copyset: its reason, a sentence, and
// the chunkserver it is about (0: the copyset itself), with the figures
// that differ from copyset to copyset for one cause.
type Finding struct {
	Reason string
	Text   string
	CS     uint64
	// Silence is how long the leader has not heard from CS; Behind how
	// many entries CS trails the leader by.
	Silence time.Duration
	Behind  uint64
}

// Judge lists what is wrong with c; nothing when it is healthy.
func Judge(c *mdspb.Copyset, p Params) []Finding {
	var out []Finding
	note := func(f Finding, format string, args ...any) {
		f.Text = fmt.Sprintf(format, args...)
		out = append(out, f)
	}
	name := p.Name
	if name == nil {
		name = func(id uint64) string { return fmt.Sprintf("chunkserver %d", id) }
	}
	replicas := p.Replicas
	if replicas == 0 {
		replicas = 3
	}
	down := map[uint64]bool{}
	for _, peer := range c.Peers {
		id := peer.ChunkserverId
		switch registered, offline := p.Member(id); {
		case !registered:
			down[id] = true
			note(Finding{Reason: PeersOffline, CS: id}, "member chunkserver %d is not registered", id)
		case offline:
			down[id] = true
			note(Finding{Reason: PeersOffline, CS: id}, "member %s is offline", name(id))
		}
	}
	if n := uint32(len(c.Peers)); n < replicas {
		note(Finding{Reason: UnderReplicated}, "%d of %d replicas", n, replicas)
	}
	leaderUsable := false
	switch {
	case c.LeaderId == 0:
		note(Finding{Reason: NoLeader}, "no leader has reported")
	case down[c.LeaderId]:
		note(Finding{Reason: NoLeader, CS: c.LeaderId}, "leader %s is offline", name(c.LeaderId))
	case !slices.ContainsFunc(c.Peers, func(pe *commonpb.Peer) bool { return pe.ChunkserverId == c.LeaderId }):
		note(Finding{Reason: NoLeader}, "reported leader %s is not a member", name(c.LeaderId))
	case p.StaleAfter > 0 && c.ReportedUnix > 0 && p.Now.Sub(time.Unix(c.ReportedUnix, 0)) > p.StaleAfter:
		note(Finding{Reason: NoLeader, CS: c.LeaderId}, "leader %s last reported %s ago", name(c.LeaderId),
			p.Now.Sub(time.Unix(c.ReportedUnix, 0)).Truncate(time.Second))
	default:
		leaderUsable = true
	}
	if !leaderUsable {
		return out
	}
	for _, pr := range c.Progress {
		if pr.ChunkserverId == c.LeaderId || down[pr.ChunkserverId] {
			continue
		}
		if Silent(pr) {
			note(Finding{Reason: UnderReplicated, CS: pr.ChunkserverId, Silence: pr.Silence()},
				"leader has not heard from %s for %s", name(pr.ChunkserverId), pr.Silence().Truncate(time.Second))
		}
		if strings.Contains(strings.ToLower(pr.State), "snapshot") {
			note(Finding{Reason: InstallingSnapshot, CS: pr.ChunkserverId}, "%s is receiving a snapshot", name(pr.ChunkserverId))
		} else if c.AppliedIndex > pr.MatchIndex && c.AppliedIndex-pr.MatchIndex > p.MaxLogGap {
			behind := c.AppliedIndex - pr.MatchIndex
			note(Finding{Reason: LogGap, CS: pr.ChunkserverId, Behind: behind}, "%s is %d entries behind the leader (allowed %d)",
				name(pr.ChunkserverId), behind, p.MaxLogGap)
		}
	}
	return out
}

// Silent reports whether a copyset's leader has not heard from a voting
// member for longer than copysetpb.PeerSilenceLimit. Raft's RecentActive
// is not used: every quorum check clears it, so a sample reads false for
// healthy members now and then.
func Silent(pr *copysetpb.PeerProgress) bool {
	return !pr.Learner && pr.Silence() > copysetpb.PeerSilenceLimit
}

// ReasonsOf lists the distinct reasons of findings, in Reasons' order.
func ReasonsOf(findings []Finding) []string {
	var out []string
	for _, r := range Reasons {
		if slices.ContainsFunc(findings, func(f Finding) bool { return f.Reason == r }) {
			out = append(out, r)
		}
	}
	return out
}
