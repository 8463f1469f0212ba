package copyset

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/internal/soon"
)

// testClock is a manual clock for TestingKnobs.Now.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func newTestClock() *testClock { return &testClock{now: time.Unix(1_000_000, 0)} }

func (k *testClock) Now() time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.now
}

func (k *testClock) Advance(d time.Duration) {
	k.mu.Lock()
	k.now = k.now.Add(d)
	k.mu.Unlock()
}

// manualCluster starts three nodes whose Raft timers move only when the test
// ticks them and whose clocks only when it advances them, and elects node 1
// as the leader of one copyset.
func manualCluster(t *testing.T) (*testCluster, *testClock, GroupID) {
	return manualClusterWith(t, nil)
}

// manualClusterWith is manualCluster with tune applied to each node's
// configuration.
func manualClusterWith(t *testing.T, tune func(*Config)) (*testCluster, *testClock, GroupID) {
	t.Helper()
	clock := newTestClock()
	tc := newMemoryCluster(t, 3, 16, func(c *Config) {
		c.TestingKnobs.ManualTicks = true
		c.TestingKnobs.Now = clock.Now
		if tune != nil {
			tune(c)
		}
	})
	id := MakeGroupID(3, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	clock.Advance(time.Hour) // past every replica's vote refusal after start
	c1 := copysetOn(t, tc, 1, id)
	if err := c1.callWait(context.Background(), func() { _ = c1.rn.Campaign() }); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if !c1.IsLeader() {
			return errNotYet
		}
		return nil
	})
	tc.writeRetry(id, 1, 0, pattern("lease|", testBlock))
	return tc, clock, id
}

var errNotYet = context.DeadlineExceeded

func copysetOn(t *testing.T, tc *testCluster, node uint64, id GroupID) *Copyset {
	t.Helper()
	c, err := tc.node(node).engine.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// raftState reads a replica's term, vote, last index and the term of its
// last entry on its Raft worker.
func raftState(t *testing.T, c *Copyset) (term, vote, last, lastTerm uint64) {
	t.Helper()
	err := c.callWait(context.Background(), func() {
		st := c.rn.BasicStatus()
		term, vote = st.GetTerm(), st.GetVote()
		last, _ = c.storage.LastIndex()
		lastTerm, _ = c.storage.Term(last)
	})
	if err != nil {
		t.Fatal(err)
	}
	return term, vote, last, lastTerm
}

// voteRequest is a vote request from node from for term, with a log as
// long as the voter's.
func voteRequest(from, to, term, last, lastTerm uint64) *raftpb.Message {
	typ := raftpb.MsgVote
	return &raftpb.Message{Type: &typ, From: &from, To: &to, Term: &term, Index: &last, LogTerm: &lastTerm}
}

// stepAndRead hands m to the replica and returns its vote afterwards (calls
// run after the messages of the same round).
func stepAndRead(t *testing.T, tc *testCluster, node uint64, id GroupID, m *raftpb.Message) (term, vote uint64) {
	t.Helper()
	tc.node(node).engine.HandleRaft(m.GetFrom(), uint64(id), m)
	term, vote, _, _ = raftState(t, copysetOn(t, tc, node, id))
	return term, vote
}

// TestRestartedReplicaRefusesVotesForAnElectionTimeout: a follower that
// restarts forgets that it heard from a leader whose read lease may still
// run. It must not vote for another candidate before an election timeout
// has passed since it started, or the new leader could accept writes that
// the old one does not see while it serves reads under its lease.
func TestRestartedReplicaRefusesVotesForAnElectionTimeout(t *testing.T) {
	tc, clock, id := manualCluster(t)
	tc.stop(2, false, 0)
	tc.start(2)
	term, _, last, lastTerm := raftState(t, copysetOn(t, tc, 2, id))

	got, vote := stepAndRead(t, tc, 2, id, voteRequest(3, 2, term+2, last, lastTerm))
	if vote == 3 {
		t.Fatalf("restarted replica voted for node 3 in term %d at once", got)
	}
	// One election timeout later it votes again.
	clock.Advance(time.Duration(10) * 20 * time.Millisecond)
	got, vote = stepAndRead(t, tc, 2, id, voteRequest(3, 2, term+3, last, lastTerm))
	if vote != 3 || got != term+3 {
		t.Fatalf("after an election timeout the replica does not vote: term %d vote %d", got, vote)
	}
}

// TestTicksCountBeforeMessagesOfTheSameRound: a follower that processes
// ticks and its leader's heartbeat in the same round must count the ticks
// as before the heartbeat. Counted after it, they would shorten the time
// the follower refuses other candidates after hearing from its leader,
// below what the leader's read lease assumes.
func TestTicksCountBeforeMessagesOfTheSameRound(t *testing.T) {
	tc, _, id := manualCluster(t)
	// Only the test talks to node 2 from now on: nothing the leader sends
	// may reset its election timer behind the test's back.
	tc.faults.Isolate(2)
	c2 := copysetOn(t, tc, 2, id)
	term, _, last, lastTerm := raftState(t, c2)
	commit := uint64(0)
	if err := c2.callWait(context.Background(), func() { commit = c2.rn.BasicStatus().GetCommit() }); err != nil {
		t.Fatal(err)
	}
	typ, from, to := raftpb.MsgHeartbeat, uint64(1), uint64(2)
	hb := &raftpb.Message{Type: &typ, From: &from, To: &to, Term: &term, Commit: &commit}
	// Three ticks that were due and the heartbeat, in one round.
	c2.enqueue(func(in *inbox) {
		in.ticks += 3
		in.msgs = append(in.msgs, hb)
	})
	raftState(t, c2) // that round is processed before the next tick arrives
	// Seven more ticks: ten in all since the round, but only seven since
	// the heartbeat.
	for range 7 {
		c2.tick()
		raftState(t, c2)
	}
	got, vote := stepAndRead(t, tc, 2, id, voteRequest(3, 2, term+2, last, lastTerm))

	if vote == 3 {
		t.Fatalf("follower voted for node 3 in term %d seven ticks after its leader's heartbeat (election timeout 10)", got)
	}
}
