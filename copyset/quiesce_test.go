package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/internal/soon"
)

// allQuiesced waits until every replica of ids on the running nodes stops
// ticking.
func allQuiesced(t *testing.T, tc *testCluster, ids []GroupID) {
	t.Helper()
	soon.Succeeds(t, 30*time.Second, func() error {
		for _, n := range tc.running() {
			for _, id := range ids {
				c, err := n.engine.Get(id)
				if err != nil {
					return err
				}
				if !c.quiesced.Load() {
					return fmt.Errorf("%s on node %d still ticks", id, n.id)
				}
			}
		}
		return nil
	})
}

// TestIdleCopysetsQuiesceAndWakeOnWork: idle groups stop ticking and
// heartbeating (a quiesce heartbeat per follower every IdleBeatTicks is all
// that is left), and a write or a read wakes one at once.
func TestIdleCopysetsQuiesceAndWakeOnWork(t *testing.T) {
	tc := newTestCluster(t, 3, 32, nil)
	ids := make([]GroupID, 8)
	for i := range ids {
		ids[i] = MakeGroupID(12, uint32(i+1))
	}
	tc.create(ids, []uint64{1, 2, 3})
	for _, id := range ids {
		tc.writeRetry(id, 1, 0, pattern("before|", testBlock))
	}
	allQuiesced(t, tc, ids)

	// Idle: per second and chunkserver, at most the quiesce heartbeats of
	// the groups it leads (ticks of 20 ms, a beat every 5 ticks: 10 a
	// second per follower), where Raft alone sends 50 per follower.
	sent := func() (n uint64) {
		for _, nd := range tc.running() {
			n += nd.engine.TransportStats().HeartbeatsSent
		}
		return n
	}
	before := sent()
	time.Sleep(time.Second)
	perSecond := sent() - before
	// A window of a second holds 10 or 11 beat rounds, by where it starts.
	if limit := uint64(len(ids) * 2 * 11 * 2); perSecond > limit { // twice for the answers
		t.Fatalf("idle groups sent %d heartbeats in a second; quiesced ones send at most %d", perSecond, limit)
	}

	// Work wakes a group: the write commits, and a read sees it.
	data := pattern("after|", testBlock)
	tc.writeRetry(ids[3], 1, 0, data)
	if got := tc.readRetry(ids[3], 1, 0, testBlock); !bytes.Equal(got, data) {
		t.Fatal("read after waking returned other data")
	}
	// ...and it goes back to sleep.
	allQuiesced(t, tc, ids)
}

// quiescedGroup starts three nodes with one copyset of pool, writes to it
// and waits until it quiesces.
func quiescedGroup(t *testing.T, pool uint32) (*testCluster, GroupID) {
	t.Helper()
	return quiescedGroupWith(t, pool, nil)
}

// quiescedGroupWith is quiescedGroup with tune applied to each node's
// configuration.
func quiescedGroupWith(t *testing.T, pool uint32, tune func(*Config)) (*testCluster, GroupID) {
	t.Helper()
	tc := newTestCluster(t, 3, 16, tune)
	id := MakeGroupID(pool, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	tc.writeRetry(id, 1, 0, pattern("q|", testBlock))
	allQuiesced(t, tc, []GroupID{id})
	return tc, id
}

// TestQuiescedGroupElectsWhenItsLeaderStops: the followers of a quiesced
// group whose leader's chunkserver stops get no quiesce heartbeats, wake
// and elect a leader, and writes go on.
func TestQuiescedGroupElectsWhenItsLeaderStops(t *testing.T) {
	tc, id := quiescedGroup(t, 13)
	old := tc.leader(id).e.cfg.NodeID
	tc.stop(old, false, 0)
	start := time.Now()
	c := tc.leader(id)
	if c.e.cfg.NodeID == old {
		t.Fatal("the stopped node still leads")
	}
	t.Logf("new leader %d after %v", c.e.cfg.NodeID, time.Since(start).Round(time.Millisecond))
	data := pattern("new leader|", testBlock)
	tc.writeRetry(id, 1, 0, data)
	if got := tc.readRetry(id, 1, 0, testBlock); !bytes.Equal(got, data) {
		t.Fatal("read after the election returned other data")
	}
}

// TestQuiescedLeaderWakesWhenAFollowerGoesSilent: a follower that stops
// answering quiesce heartbeats (cut off by a partition that drops messages
// without any send error) wakes its leader, so that Raft sees the follower
// inactive (and the chunkserver reports it) as it would awake.
func TestQuiescedLeaderWakesWhenAFollowerGoesSilent(t *testing.T) {
	tc, id := quiescedGroup(t, 14)
	lead := tc.leader(id)
	var follower uint64
	for _, n := range []uint64{1, 2, 3} {
		if n != lead.e.cfg.NodeID {
			follower = n
			break
		}
	}
	tc.faults.Partition(lead.e.cfg.NodeID, follower)
	soon.Succeeds(t, 10*time.Second, func() error {
		if lead.quiesced.Load() {
			return fmt.Errorf("leader %d still quiesced with node %d cut off", lead.e.cfg.NodeID, follower)
		}
		return nil
	})
	tc.writeRetry(id, 1, 0, pattern("two of three|", testBlock))
	tc.faults.Heal()
}

// TestWakingFollowerKeepsTheLeaseOfAHeartbeatItJustAnswered: a quiesced
// follower's wake (queued by a tick while it heard nothing) can be handled
// in the same round as its leader's first heartbeat after the silence, one
// that the leader counts toward its read lease. Waking must not then run the
// follower's election clock forward by a whole election timeout: it would
// vote for another candidate at once, and a new leader could acknowledge
// writes that the old one, reading under its lease, does not see.
func TestWakingFollowerKeepsTheLeaseOfAHeartbeatItJustAnswered(t *testing.T) {
	tc, clock, id := manualClusterWith(t, func(c *Config) { c.TestingKnobs.QuiesceManualTicks = true })
	// Only the test talks to node 2 from now on.
	tc.faults.Isolate(2)
	c2 := copysetOn(t, tc, 2, id)
	term, _, last, _ := raftState(t, c2)
	commit := uint64(0)
	if err := c2.callWait(context.Background(), func() { commit = c2.rn.BasicStatus().GetCommit() }); err != nil {
		t.Fatal(err)
	}
	// The candidate's log is longer than any the follower may hold (its
	// appends are asynchronous): only the lease can make it refuse.
	last, lastTerm := last+100, term
	// The follower sleeps, and hears nothing from its leader for a long
	// time (the leader's process was stopped, say).
	c2.quiesced.Store(true)
	clock.Advance(time.Minute)
	// The leader is back and confirms its lease with a heartbeat; the
	// follower's wake is handled in the same round.
	typ, from, to := raftpb.MsgHeartbeat, uint64(1), uint64(2)
	hb := &raftpb.Message{Type: &typ, From: &from, To: &to, Term: &term, Commit: &commit, Context: []byte("read")}
	c2.enqueue(func(in *inbox) {
		in.wake = true
		in.msgs = append(in.msgs, hb)
	})
	// The round wakes the follower (a call may run in the same round,
	// before its quiescence is decided: look until it is).
	soon.Succeeds(t, 5*time.Second, func() error {
		if c2.quiesced.Load() {
			return errors.New("the follower still sleeps after its leader's heartbeat")
		}
		return nil
	})

	got, vote := stepAndRead(t, tc, 2, id, voteRequest(3, 2, term+2, last, lastTerm))
	if vote == 3 {
		t.Fatalf("follower voted for node 3 in term %d right after answering its leader's heartbeat", got)
	}
	// An election timeout later it does.
	for range 12 {
		c2.tick()
		raftState(t, c2) // one tick a round: a round counts at most three
	}
	clock.Advance(time.Second)
	got, vote = stepAndRead(t, tc, 2, id, voteRequest(3, 2, term+3, last, lastTerm))
	if vote != 3 || got != term+3 {
		t.Fatalf("an election timeout after the heartbeat the follower does not vote: term %d vote %d", got, vote)
	}
}
