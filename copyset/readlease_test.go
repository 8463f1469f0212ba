package copyset

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
)

// TestLeaseReadsSkipTheRaftWorker: while its lease holds, a leader serves
// reads without a turn of its Raft worker (it answers one while the worker
// is held); past half the lease, reads go through the worker again, which
// renews the lease.
func TestLeaseReadsSkipTheRaftWorker(t *testing.T) {
	tc, clock, id := manualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	want := pattern("lease|", testBlock)
	buf := make([]byte, testBlock)
	if err := c1.Read(context.Background(), 1, 0, buf); err != nil { // confirms the lease
		t.Fatal(err)
	}

	release := holdWorker(t, c1)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := c1.Read(ctx, 1, 0, buf)
	cancel()
	if err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("read under the lease while the Raft worker is held: %v", err)
	}

	clock.Advance(c1.leaseDuration()/2 + time.Millisecond)
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	err = c1.Read(ctx, 1, 0, buf)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read past half the lease while the Raft worker is held: %v, want it to wait for the worker", err)
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
