package copyset

import (
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
)

// TestDesignatedSuccessorCampaignsAfterTheElectionTimeout: when the leader
// goes silent, the follower with the lowest id campaigns as soon as the
// election timeout and its margin have passed, instead of after Raft's
// random timeout of up to twice as long; the other follower grants it.
// With an election timeout of 100 ticks, Raft alone would elect someone
// between tick 100 and 200, the lower-id follower before tick 103 only by
// a rare chance.
func TestDesignatedSuccessorCampaignsAfterTheElectionTimeout(t *testing.T) {
	const electionTicks = 100
	tc, _, id := manualClusterWith(t, func(c *Config) { c.ElectionTicks = electionTicks })
	c1 := copysetOn(t, tc, 1, id)
	c2, c3 := copysetOn(t, tc, 2, id), copysetOn(t, tc, 3, id)
	// Both followers hold the whole log, so either may win the vote.
	soon.True(t, 10*time.Second, "followers caught up with their leader", func() bool {
		_, _, last1, _ := raftState(t, c1)
		_, _, last2, _ := raftState(t, c2)
		_, _, last3, _ := raftState(t, c3)
		return c2.Leader() == 1 && c3.Leader() == 1 && last2 == last1 && last3 == last1
	})

	tc.stop(1, false, 0)
	tickBoth := func() {
		for _, c := range []*Copyset{c2, c3} {
			c.tick()
			raftState(t, c) // the tick's round is processed
		}
	}
	for range electionTicks + campaignMarginTicks - 1 {
		tickBoth()
	}
	if c2.IsLeader() || c3.IsLeader() {
		t.Fatalf("a follower was elected before the election timeout plus margin")
	}
	tickBoth()
	// The pre-vote and vote rounds need messages only, no more ticks.
	soon.True(t, 10*time.Second, "node 2 elected without further ticks", c2.IsLeader)
	if got := tc.readRetry(id, 1, 0, testBlock); string(got) != string(pattern("lease|", testBlock)) {
		t.Fatalf("new leader reads %q", got[:16])
	}
}
