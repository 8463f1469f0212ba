package copyset

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/tracker"

	"cairn.io/cairn/internal/soon"
)

// TestCommitOnlyAppendsAreNotSent: a write costs the leader one append per
// follower. Raft would follow each commit with an append that carries only
// the new commit index (and the follower's answer to it); the leader keeps
// those back, and the followers learn the commit index from its next
// heartbeat instead.
func TestCommitOnlyAppendsAreNotSent(t *testing.T) {
	tc, _, id := manualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	matched := func(idx uint64) error {
		var err error
		if e := c1.callWait(context.Background(), func() {
			c1.rn.WithProgress(func(peer uint64, _ raft.ProgressType, pr tracker.Progress) {
				if pr.Match < idx || pr.State != tracker.StateReplicate {
					err = fmt.Errorf("peer %d matches %d (%s), want %d", peer, pr.Match, pr.State, idx)
				}
			})
		}); e != nil {
			return e
		}
		return err
	}
	last, _ := c1.storage.LastIndex()
	soon.Succeeds(t, 10*time.Second, func() error { return matched(last) })

	before := tc.node(1).engine.TransportStats().MessagesSent
	for i := range 3 {
		idx := tc.writeRetry(id, 1, int64(i)*testBlock, pattern(fmt.Sprintf("write %d|", i), testBlock))
		soon.Succeeds(t, 10*time.Second, func() error { return matched(idx) })
		last = idx
	}
	if sent := tc.node(1).engine.TransportStats().MessagesSent - before; sent != 6 {
		t.Fatalf("the leader sent %d messages for 3 writes, want 6 (one append per follower and write)", sent)
	}
	for _, n := range []uint64{2, 3} {
		if a := copysetOn(t, tc, n, id).AppliedIndex(); a >= last {
			t.Fatalf("follower %d applied %d before any heartbeat told it that %d is committed", n, a, last)
		}
	}
	// The next heartbeat carries the commit index.
	c1.tick()
	soon.Succeeds(t, 10*time.Second, func() error {
		for _, n := range []uint64{2, 3} {
			if a := copysetOn(t, tc, n, id).AppliedIndex(); a < last {
				return fmt.Errorf("follower %d applied %d, want %d", n, a, last)
			}
		}
		return nil
	})
}

// TestLostAppendIsRepairedWithoutWrites: when the append of the last write
// never reached a follower and nothing is written afterwards, the append
// Raft sends in answer to the follower's heartbeat answer (empty, its next
// index being past the log) is what the follower rejects to start the probe
// that repairs it; the leader must not keep it back as commit-only.
func TestLostAppendIsRepairedWithoutWrites(t *testing.T) {
	tc, _, id := manualCluster(t)
	tc.faults.Partition(1, 2)
	idx := tc.writeRetry(id, 1, 0, pattern("lost|", testBlock))
	tc.faults.Heal()
	c1 := copysetOn(t, tc, 1, id)
	soon.Succeeds(t, 10*time.Second, func() error {
		c1.tick()
		if a := copysetOn(t, tc, 2, id).AppliedIndex(); a < idx {
			return fmt.Errorf("follower 2 applied %d, want %d", a, idx)
		}
		return nil
	})
}

// TestRemovedFollowerLearnsItsRemoval: the commit of a membership change
// reaches every follower at once, the one it removes included; once the
// leader applied the change it sends that follower nothing more.
func TestRemovedFollowerLearnsItsRemoval(t *testing.T) {
	tc, _, id := manualCluster(t)
	c1 := copysetOn(t, tc, 1, id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c1.RemovePeer(ctx, 3, c1.ConfEpoch()); err != nil {
		t.Fatal(err)
	}
	// No tick: no heartbeat may carry the commit index.
	soon.Succeeds(t, 10*time.Second, func() error {
		if v := copysetOn(t, tc, 3, id).ConfState().GetVoters(); slices.Contains(v, 3) {
			return fmt.Errorf("the removed replica still counts voters %v", v)
		}
		return nil
	})
}
