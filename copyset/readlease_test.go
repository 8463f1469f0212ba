package copyset

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/internal/soon"
)

// TestLeaseReadsSkipTheRaftWorker: while its lease holds, a leader serves
// reads without a turn of its Raft worker (it answers one while the worker
// is held); past three quarters of the lease, reads go through the worker
// again, which renews the lease.
func TestLeaseReadsSkipTheRaftWorker(t *testing.T) {
	c1, clock := leaderUnderLease(t)
	want := pattern("lease|", testBlock)
	buf := make([]byte, testBlock)

	release := holdWorker(t, c1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := c1.Read(ctx, 1, 0, buf)
	cancel()
	if err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("read under the lease while the Raft worker is held: %v", err)
	}

	clock.Advance(c1.leaseDuration()*3/4 + time.Millisecond)
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	err = c1.Read(ctx, 1, 0, buf)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read late in the lease while the Raft worker is held: %v, want it to wait for the worker", err)
	}
	release()
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("read through the worker: %v", err)
	}
}

// TestTransferEndsLeaseReads: a leader that hands its leadership over stops
// serving reads under its lease the moment it tells the target to campaign,
// even while it hears nothing of the election that follows: the new leader
// may take writes at once, and a read of the old one would miss them.
func TestTransferEndsLeaseReads(t *testing.T) {
	tc, _, id := manualCluster(t)
	c1, c2 := copysetOn(t, tc, 1, id), copysetOn(t, tc, 2, id)
	buf := make([]byte, testBlock)
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil { // confirms the lease
		t.Fatal(err)
	}
	tc.allApplied([]GroupID{id}, 10*time.Second) // node 2 is up to date: the transfer starts at once
	// Node 1 hears nothing more from its peers: it stays leader in its own eyes.
	tc.faults.Cut(2, 1)
	tc.faults.Cut(3, 1)
	if err := c1.callWait(context.Background(), func() { c1.rn.TransferLeader(2) }); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if !c2.IsLeader() {
			return errNotYet
		}
		return nil
	})
	if !c1.IsLeader() {
		t.Fatal("node 1 learnt that it lost the leadership: the test needs it not to")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err := writeWait(ctx, c2, 1, 1, 1, 0, pattern("after|", testBlock))
	cancel()
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
	err = c1.Read(ctx, 1, 0, buf)
	cancel()
	if err == nil {
		t.Fatalf("the old leader served a read after the transfer: %.16q (the new leader acknowledged %q)", buf, "after|")
	}
}

// holdWorker keeps c's Raft worker busy until the returned func is called.
func holdWorker(t *testing.T, c *Copyset) (release func()) {
	t.Helper()
	held, done := make(chan struct{}), make(chan struct{})
	if !c.call(func() {
		close(held)
		<-done
	}) {
		t.Fatal("copyset stopped")
	}
	<-held
	var once bool
	t.Cleanup(func() {
		if !once {
			close(done)
		}
	})
	return func() {
		once = true
		close(done)
	}
}

// TestAbortedTransferEndsLeaseReadsForTheTerm: a transfer whose
// MsgTimeoutNow is still on its way when Raft gives the transfer up. The old
// leader must take no new lease in that term: the target may still win a
// forced election (voters ignore their lease for a transfer) and its writes
// would be missing from the old leader's reads.
func TestAbortedTransferEndsLeaseReadsForTheTerm(t *testing.T) {
	tc, _, id := manualCluster(t)
	c1, c2 := copysetOn(t, tc, 1, id), copysetOn(t, tc, 2, id)
	ctx := context.Background()
	buf := make([]byte, testBlock)
	if err := c1.Read(ctx, 1, 0, buf); err != nil {
		t.Fatal(err)
	}
	tc.allApplied([]GroupID{id}, 10*time.Second)
	tc.faults.Cut(1, 2) // what node 1 sends node 2 is held up (dropped here; re-sent below)
	var term, transferee uint64
	if err := c1.callWait(ctx, func() { term = c1.rn.BasicStatus().GetTerm(); c1.rn.TransferLeader(2) }); err != nil {
		t.Fatal(err)
	}
	if err := c1.callWait(ctx, func() { transferee = c1.rn.BasicStatus().LeadTransferee }); err != nil || transferee != 2 {
		t.Fatalf("transfer not started: %v %d", err, transferee)
	}
	for range 12 {
		c1.tick()
		raftState(t, c1)
	}
	if err := c1.callWait(ctx, func() { transferee = c1.rn.BasicStatus().LeadTransferee }); err != nil || transferee != 0 || !c1.IsLeader() {
		t.Fatalf("transfer not given up: %v %d leader %v", err, transferee, c1.IsLeader())
	}
	// A read after the abort: a ReadIndex round answered by node 3 renews the lease.
	if err := c1.Read(ctx, 1, 0, buf); err != nil {
		t.Fatal(err)
	}
	tc.faults.Cut(2, 1)
	tc.faults.Cut(3, 1)
	// The MsgTimeoutNow node 1 sent arrives late.
	typ, from, to := raftpb.MsgTimeoutNow, uint64(1), uint64(2)
	tc.node(2).engine.HandleRaft(1, uint64(id), &raftpb.Message{Type: &typ, From: &from, To: &to, Term: &term})
	soon.Succeeds(t, 10*time.Second, func() error {
		if !c2.IsLeader() {
			return errNotYet
		}
		return nil
	})
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := writeWait(wctx, c2, 1, 1, 1, 0, pattern("after|", testBlock))
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err = c1.Read(rctx, 1, 0, buf)
	cancel()
	if err == nil && !bytes.Equal(buf, pattern("after|", testBlock)) {
		t.Fatalf("stale read on node 1 (leader=%v) after node 2 acknowledged a write: %.16q", c1.IsLeader(), buf)
	}
}

// TestLeaseReadsWaitForWhatEarlierLeadersCommitted: a replica that becomes
// leader before it applied what its predecessor acknowledged must not serve
// a read under its lease until it did.
func TestLeaseReadsWaitForWhatEarlierLeadersCommitted(t *testing.T) {
	tc, _, id := manualCluster(t)
	c1, c2 := copysetOn(t, tc, 1, id), copysetOn(t, tc, 2, id)
	ctx := context.Background()
	if err := c1.Read(ctx, 1, 0, make([]byte, testBlock)); err != nil { // its heartbeats carry the commit index
		t.Fatal(err)
	}
	tc.allApplied([]GroupID{id}, 10*time.Second)
	c2.smMu.Lock() // node 2 applies nothing from now on
	unlocked := false
	unlock := func() {
		if !unlocked {
			unlocked = true
			c2.smMu.Unlock()
		}
	}
	t.Cleanup(unlock)
	if _, err := writeWait(ctx, c1, 1, 1, 1, 0, pattern("new|", testBlock)); err != nil {
		t.Fatal(err)
	}
	tctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := c1.TransferLeader(tctx, 2, c1.ConfEpoch())
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	// A first read confirms the new leader's lease (and waits for its apply).
	first := make(chan error, 1)
	go func() { first <- c2.Read(ctx, 1, 0, make([]byte, testBlock)) }()
	soon.Succeeds(t, 10*time.Second, func() error {
		if c2.lease.Load() == nil {
			return errNotYet
		}
		return nil
	})
	buf := make([]byte, testBlock)
	rctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = c2.Read(rctx, 1, 0, buf)
	cancel()
	if err == nil {
		t.Fatalf("the new leader served %.8q under its lease before applying %q, acknowledged by its predecessor", buf, "new|")
	}
	unlock()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := c2.Read(ctx, 1, 0, buf); err != nil || !bytes.Equal(buf, pattern("new|", testBlock)) {
		t.Fatalf("read after the apply: %.8q, %v", buf, err)
	}
}

// TestReadsWithoutWaitingFailRatherThanWait: under WithoutWaiting a read
// that the lease lets through is served; one that would wait for a turn of
// the Raft worker (the lease past three quarters) fails at once with
// ErrWouldWait and reads nothing, and the same read with waiting allowed
// is then served.
func TestReadsWithoutWaitingFailRatherThanWait(t *testing.T) {
	c1, clock := leaderUnderLease(t)
	want := pattern("lease|", testBlock)
	buf := make([]byte, testBlock)
	noWait := WithoutWaiting(context.Background())
	clear(buf)
	if err := c1.Read(noWait, 1, 0, buf); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("read without waiting under the lease: %v", err)
	}

	clock.Advance(c1.leaseDuration()*3/4 + time.Millisecond)
	clear(buf)
	if err := c1.Read(noWait, 1, 0, buf); !errors.Is(err, ErrWouldWait) {
		t.Fatalf("read without waiting late in the lease: %v, want ErrWouldWait", err)
	}
	if !bytes.Equal(buf, make([]byte, testBlock)) {
		t.Fatalf("the refused read read something")
	}
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("read with waiting: %v", err)
	}
}

// leaderUnderLease returns node 1's replica of a manual-clock cluster's
// copyset, as leader with a lease confirmed by a first read, and the clock.
func leaderUnderLease(t *testing.T) (*Copyset, *testClock) {
	t.Helper()
	tc, clock, id := manualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	if err := c1.Read(context.Background(), 1, 0, make([]byte, testBlock)); err != nil {
		t.Fatal(err)
	}
	return c1, clock
}
