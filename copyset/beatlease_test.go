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

// TestReadsKeepAQuiescedGroupAsleep: a group that only serves reads
// quiesces like an idle one, and serves them under the lease its quiesce
// heartbeats keep, without waking: it costs what an idle group does.
func TestReadsKeepAQuiescedGroupAsleep(t *testing.T) {
	// Ticks of 50 ms: a lease of 400 ms, renewed every 250 ms; a round's
	// answers may be 150 ms late before a read finds the lease lapsed.
	tc, id := quiescedGroupWith(t, 15, func(c *Config) { c.TickInterval = 50 * time.Millisecond })
	want := pattern("awake|", testBlock)
	tc.writeRetry(id, 1, 0, want) // wakes the group
	lead := tc.leader(id)
	buf := make([]byte, testBlock)
	read := func() {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := lead.Read(ctx, 1, 0, buf)
		cancel()
		if err != nil || !bytes.Equal(buf, want) {
			t.Fatalf("read: %v", err)
		}
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		for range 50 {
			read()
			time.Sleep(time.Millisecond)
		}
		for _, n := range tc.running() {
			if c := copysetOn(t, tc, n.id, id); !c.Quiesced() {
				return fmt.Errorf("node %d still ticks while the group only serves reads", n.id)
			}
		}
		return nil
	})
	start := time.Now()
	// About five leases and eight rounds of quiesce heartbeats.
	for reads := 0; time.Since(start) < 2*time.Second; reads++ {
		read()
		for _, n := range tc.running() {
			if c := copysetOn(t, tc, n.id, id); !c.Quiesced() {
				t.Fatalf("read %d (%v after the first) woke the replica on node %d", reads, time.Since(start).Round(time.Millisecond), n.id)
			}
		}
		time.Sleep(time.Millisecond)
	}
}

// quiescedManualCluster is manualClusterWith quiescence on: the nodes are
// ticked by hand until the group quiesces.
func quiescedManualCluster(t *testing.T) (*testCluster, *testClock, GroupID) {
	t.Helper()
	tc, clock, id := manualClusterWith(t, func(c *Config) { c.TestingKnobs.QuiesceManualTicks = true })
	soon.Succeeds(t, 20*time.Second, func() error {
		for _, n := range tc.running() {
			n.engine.tickAll()
		}
		time.Sleep(5 * time.Millisecond) // let the heartbeats be answered
		for _, n := range tc.running() {
			if !copysetOn(t, tc, n.id, id).Quiesced() {
				return fmt.Errorf("node %d still ticks", n.id)
			}
		}
		return nil
	})
	return tc, clock, id
}

// TestQuiesceHeartbeatAnswersConfirmTheRoundTheyAnswer: the lease runs from
// when the round that a quorum answered was sent; an answer to an earlier
// round never confirms a later one, and answers of another term or of an
// unknown round confirm nothing.
func TestQuiesceHeartbeatAnswersConfirmTheRoundTheyAnswer(t *testing.T) {
	tc, clock, id := quiescedManualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	clock.Advance(time.Minute) // every lease so far is over
	var term uint64
	var r1, r2 []byte
	var t1, t2 time.Time
	run := func(f func()) {
		t.Helper()
		if err := c1.callQuietWait(context.Background(), f); err != nil {
			t.Fatal(err)
		}
	}
	run(func() {
		term = c1.rn.BasicStatus().GetTerm()
		t1, r1 = clock.Now(), c1.beatContext(term)
	})
	clock.Advance(50 * time.Millisecond)
	run(func() { t2, r2 = clock.Now(), c1.beatContext(term) })
	answer := func(from, term uint64, ctx []byte) (until time.Time) {
		typ := raftpb.MsgHeartbeatResp
		to := uint64(1)
		m := &raftpb.Message{Type: &typ, From: &from, To: &to, Term: &term, Context: bytes.Clone(ctx)}
		run(func() {
			c1.noteBeatAnswer(m)
			until = c1.leaseUntil
		})
		if m.Context != nil {
			t.Fatal("the answer keeps its marker: Raft would read it as a count of reads")
		}
		return until
	}
	if got := answer(2, term+1, r2); got.After(clock.Now()) {
		t.Fatalf("an answer of another term confirmed a lease until %v", got)
	}
	if got := answer(2, term, []byte(quiesceContext)); got.After(clock.Now()) {
		t.Fatalf("an answer without a round confirmed a lease until %v", got)
	}
	if got, want := answer(2, term, r1), t1.Add(c1.leaseDuration()); !got.Equal(want) {
		t.Fatalf("the answer to the first round gave a lease until %v, want %v (from when that round was sent)", got, want)
	}
	if got, want := answer(3, term, r2), t2.Add(c1.leaseDuration()); !got.Equal(want) {
		t.Fatalf("the answer to the second round gave a lease until %v, want %v", got, want)
	}
	// An old answer arriving late takes nothing back, and extends nothing.
	if got, want := answer(3, term, r1), t2.Add(c1.leaseDuration()); !got.Equal(want) {
		t.Fatalf("a late answer moved the lease to %v, want %v", got, want)
	}
	// A round answered after beatSlots later rounds were sent is forgotten:
	// its slot holds a later round, whose time it must not borrow.
	var r3 []byte
	for i := range beatSlots + 1 {
		clock.Advance(50 * time.Millisecond)
		run(func() {
			ctx := c1.beatContext(term)
			if i == 0 {
				r3 = ctx
			}
		})
	}
	if got, want := answer(2, term, r3), t2.Add(c1.leaseDuration()); !got.Equal(want) {
		t.Fatalf("an answer to a forgotten round moved the lease to %v, want %v", got, want)
	}
}

// TestReadLateInTheLeaseRenewsItWithQuiesceHeartbeats: a read that reaches
// the Raft worker of a quiesced leader late in its lease (its rounds went
// unanswered, or no round was due: here the clock moves and nothing ticks) is
// served under the lease and sends a round out of turn, whose answers renew
// the lease; nothing wakes.
func TestReadLateInTheLeaseRenewsItWithQuiesceHeartbeats(t *testing.T) {
	tc, clock, id := quiescedManualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	until := func() (u time.Time) {
		t.Helper()
		if err := c1.callQuietWait(context.Background(), func() { u = c1.leaseUntil }); err != nil {
			t.Fatal(err)
		}
		return u
	}
	buf := make([]byte, testBlock)
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil {
		t.Fatal(err)
	}
	before := until()
	clock.Advance(before.Sub(clock.Now()) - c1.leaseDuration()/8)
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil || !bytes.Equal(buf, pattern("lease|", testBlock)) {
		t.Fatalf("read late in the lease: %v", err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if u := until(); !u.After(before) {
			return fmt.Errorf("the lease still ends at %v", u)
		}
		return nil
	})
	for _, n := range tc.running() {
		if !copysetOn(t, tc, n.id, id).Quiesced() {
			t.Fatalf("the read woke node %d", n.id)
		}
	}
}

// TestCutOffQuiescedLeaderStopsServingReads: a quiesced leader cut off from
// its followers keeps sending its rounds of quiesce heartbeats, but rounds
// nobody answers confirm nothing: once the lease of the last answered round
// ran out (and the followers elected another leader, which took a write),
// the old leader serves no read, least of all the value before that write.
func TestCutOffQuiescedLeaderStopsServingReads(t *testing.T) {
	tc, clock, id := quiescedManualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	buf := make([]byte, testBlock)
	old := pattern("lease|", testBlock)
	// Under the lease of the answered rounds, a read is served and
	// wakes nothing.
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil || !bytes.Equal(buf, old) {
		t.Fatalf("read of the quiesced leader: %v", err)
	}
	if !c1.Quiesced() {
		t.Fatal("a read under the lease woke the leader")
	}

	tc.faults.Isolate(1)
	clock.Advance(2 * time.Second)
	// The old leader sends a round of quiesce heartbeats that nobody
	// answers; its followers hear nothing, wake and elect a leader.
	tick := func(nodes ...uint64) {
		for _, n := range nodes {
			tc.node(n).engine.tickAll()
		}
		time.Sleep(2 * time.Millisecond)
	}
	for range 5 {
		tick(1)
	}
	var nl *Copyset // node 2, the designated successor, or node 3 when its timeout ran out first
	soon.Succeeds(t, 20*time.Second, func() error {
		tick(2, 3)
		for _, n := range []uint64{2, 3} {
			if c := copysetOn(t, tc, n, id); c.IsLeader() {
				nl = c
				return nil
			}
		}
		return errNotYet
	})
	if !c1.IsLeader() || !c1.Quiesced() {
		t.Fatal("node 1 learnt that it lost the leadership, or woke: the test needs it not to")
	}
	newer := pattern("newer|", testBlock)
	soon.Succeeds(t, 20*time.Second, func() error {
		tick(2, 3)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := writeWait(ctx, nl, 1, 1, 1, 0, newer)
		return err
	})

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	err := c1.Read(ctx, 1, 0, buf)
	cancel()
	switch {
	case err == nil && bytes.Equal(buf, old):
		t.Fatal("the cut-off leader read the value before the new leader's write")
	case err == nil:
		t.Fatal("the cut-off leader served a read")
	case !errors.Is(err, context.DeadlineExceeded):
		t.Logf("read refused: %v", err)
	}
	if c1.Quiesced() {
		t.Fatal("a read that found the lease lapsed did not wake its leader")
	}
	tc.faults.Heal()
}
