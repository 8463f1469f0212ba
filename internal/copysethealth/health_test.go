package copysethealth

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// TestJudgeFindings: each finding names its reason, the chunkserver it is
// about and the figures a grouping by cause needs, with one sentence.
func TestJudgeFindings(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	c := &mdspb.Copyset{
		Peers:    []*commonpb.Peer{{ChunkserverId: 1}, {ChunkserverId: 2}, {ChunkserverId: 3}, {ChunkserverId: 4}},
		LeaderId: 1, AppliedIndex: 5000, ReportedUnix: now.Unix(),
		Progress: []*copysetpb.PeerProgress{
			{ChunkserverId: 1, MatchIndex: 5000},
			{ChunkserverId: 2, MatchIndex: 3000, State: "replicate", HeardMsAgo: 7500},
			{ChunkserverId: 3, MatchIndex: 0, State: "snapshot"},
			{ChunkserverId: 4, MatchIndex: 0, State: "probe", HeardMsAgo: 9000},
		},
	}
	got := Judge(c, Params{
		Replicas: 3, MaxLogGap: DefaultMaxLogGap, StaleAfter: DefaultStaleAfter, Now: now,
		Member: func(id uint64) (bool, bool) { return id != 4, false },
		Name:   func(id uint64) string { return fmt.Sprintf("cs%d", id) },
	})
	want := []Finding{
		{Reason: PeersOffline, CS: 4, Text: "member chunkserver 4 is not registered"},
		{Reason: UnderReplicated, CS: 2, Silence: 7500 * time.Millisecond, Text: "leader has not heard from cs2 for 7s"},
		{Reason: LogGap, CS: 2, Behind: 2000, Text: "cs2 is 2000 entries behind the leader (allowed 1000)"},
		{Reason: InstallingSnapshot, CS: 3, Text: "cs3 is receiving a snapshot"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("findings\n%+v\nwant\n%+v", got, want)
	}
	if r := ReasonsOf(got); !slices.Equal(r, []string{PeersOffline, UnderReplicated, LogGap, InstallingSnapshot}) {
		t.Fatalf("reasons %v", r)
	}
	// A stale leader report hides the followers' progress.
	c.ReportedUnix = now.Add(-time.Minute).Unix()
	got = Judge(c, Params{Replicas: 3, StaleAfter: DefaultStaleAfter, Now: now, Member: func(uint64) (bool, bool) { return true, false }})
	if len(got) != 1 || got[0].Reason != NoLeader || got[0].Text != "leader chunkserver 1 last reported 1m0s ago" {
		t.Fatalf("stale leader: %+v", got)
	}
}
