package mds

import (
	"slices"
	"testing"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/copysethealth"
)

// TestClassifyCopyset: the MDS judges a copyset with cairn-ops status's
// reasons and thresholds (docs/ops.md), each reason once, and allocates
// only in copysets with every replica and none offline.
func TestClassifyCopyset(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	peers := func(ids ...uint64) []*commonpb.Peer {
		var out []*commonpb.Peer
		for _, id := range ids {
			out = append(out, &commonpb.Peer{ChunkserverId: id})
		}
		return out
	}
	follower := func(id, match uint64, state string, heardMs uint64) *copysetpb.PeerProgress {
		return &copysetpb.PeerProgress{ChunkserverId: id, MatchIndex: match, State: state, HeardMsAgo: heardMs}
	}
	fine := []*copysetpb.PeerProgress{follower(1, 5000, "replicate", 0), follower(2, 5000, "replicate", 50), follower(3, 4990, "replicate", 80)}
	base := func() *mdspb.Copyset {
		return &mdspb.Copyset{Peers: peers(1, 2, 3), LeaderId: 1, AppliedIndex: 5000, ReportedUnix: now.Unix() - 2, Progress: fine}
	}
	for _, tc := range []struct {
		name        string
		edit        func(*mdspb.Copyset)
		down        []uint64
		want        []string
		allocatable bool
	}{
		{"healthy", nil, nil, nil, true},
		{"no leader reported", func(c *mdspb.Copyset) { c.LeaderId, c.Progress = 0, nil }, nil, []string{copysethealth.NoLeader}, true},
		{"leader offline", nil, []uint64{1}, []string{copysethealth.NoLeader, copysethealth.PeersOffline}, false},
		{"leader not a member", func(c *mdspb.Copyset) { c.LeaderId = 9 }, nil, []string{copysethealth.NoLeader}, true},
		{"leader report stale", func(c *mdspb.Copyset) {
			c.ReportedUnix = now.Add(-copysethealth.DefaultStaleAfter - time.Second).Unix()
		}, nil, []string{copysethealth.NoLeader}, true},
		{"follower offline", nil, []uint64{3}, []string{copysethealth.PeersOffline}, false},
		{"two of three replicas", func(c *mdspb.Copyset) { c.Peers = peers(1, 2); c.Progress = fine[:2] }, nil, []string{copysethealth.UnderReplicated}, false},
		{"follower silent", func(c *mdspb.Copyset) {
			c.Progress = []*copysetpb.PeerProgress{fine[0], fine[1], follower(3, 4990, "probe", 4000)}
		}, nil, []string{copysethealth.UnderReplicated}, true},
		{"learner silent", func(c *mdspb.Copyset) {
			lr := follower(4, 4990, "probe", 60_000)
			lr.Learner = true
			c.Progress = append(fine, lr)
		}, nil, nil, true},
		{"log gap", func(c *mdspb.Copyset) {
			c.Progress = []*copysetpb.PeerProgress{fine[0], fine[1], follower(3, 5000-copysethealth.DefaultMaxLogGap-1, "replicate", 10)}
		}, nil, []string{copysethealth.LogGap}, true},
		{"gap at the limit", func(c *mdspb.Copyset) {
			c.Progress = []*copysetpb.PeerProgress{fine[0], fine[1], follower(3, 5000-copysethealth.DefaultMaxLogGap, "replicate", 10)}
		}, nil, nil, true},
		{"installing snapshot", func(c *mdspb.Copyset) {
			c.Progress = []*copysetpb.PeerProgress{fine[0], fine[1], follower(3, 0, "snapshot", 10)}
		}, nil, []string{copysethealth.InstallingSnapshot}, true},
		{"several reasons, each once", func(c *mdspb.Copyset) {
			c.Progress = []*copysetpb.PeerProgress{fine[0], follower(2, 1, "replicate", 9000), follower(3, 1, "replicate", 9000)}
		}, []uint64{3}, []string{copysethealth.PeersOffline, copysethealth.UnderReplicated, copysethealth.LogGap}, false},
		{"progress of an offline leader ignored", func(c *mdspb.Copyset) {
			c.Progress = []*copysetpb.PeerProgress{fine[0], follower(2, 0, "snapshot", 9000), fine[2]}
		}, []uint64{1}, []string{copysethealth.NoLeader, copysethealth.PeersOffline}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			if tc.edit != nil {
				tc.edit(c)
			}
			member := func(id uint64) (bool, bool) { return true, slices.Contains(tc.down, id) }
			h := classifyCopyset(c, 3, member, now)
			if !slices.Equal(h.reasons, tc.want) || h.allocatable != tc.allocatable {
				t.Fatalf("reasons %v allocatable %v, want %v %v", h.reasons, h.allocatable, tc.want, tc.allocatable)
			}
		})
	}
}
