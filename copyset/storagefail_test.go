package copyset

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// TestFailedChunkSyncIsRepairedFromTheLog: a chunk file's fdatasync fails
// on one replica, and the pages it could not write are gone (Linux reports a
// writeback error once; a second fdatasync of the file then succeeds
// without them). The replica must not record a checkpoint past that data:
// it rewrites what it applied since its last checkpoint from its log and
// syncs again, and ends up holding exactly its peers' data. When the sync
// fails again after the rewrite, the replica breaks instead of serving data
// it does not hold.
func TestFailedChunkSyncIsRepairedFromTheLog(t *testing.T) {
	for _, failures := range []int{1, 2} {
		t.Run(fmt.Sprintf("failures=%d", failures), func(t *testing.T) {
			tc := newCrashableCluster(t, 3, 32, func(c *Config) { c.CheckpointBytes = 32 << 10 })
			id := MakeGroupID(9, uint32(failures))
			tc.create([]GroupID{id}, []uint64{1, 2, 3})
			for k := range 16 {
				tc.writeRetry(id, 1, int64(k)*testBlock, pattern(fmt.Sprintf("a%d|", k), testBlock))
			}
			victim := uint64(2)
			disk := tc.disks[victim]
			if _, err := disk.FailSync(`/chunks/chunk_`, failures); err != nil {
				t.Fatal(err)
			}
			for k := range 32 {
				tc.writeRetry(id, 1, int64(16+k)*testBlock, pattern(fmt.Sprintf("b%d|", k), testBlock))
			}
			c, err := tc.node(victim).engine.Get(id)
			if err != nil {
				t.Fatal(err)
			}
			succeedsSoon(t, 30*time.Second, func() error {
				if disk.Stats().SyncFaults < uint64(failures) {
					c.requestCheckpoint()
					return fmt.Errorf("%d of %d failed syncs so far", disk.Stats().SyncFaults, failures)
				}
				return nil
			})
			if failures == 1 {
				// Repaired: more writes and checkpoints, and the replica
				// holds what its peers hold.
				for k := range 8 {
					tc.writeRetry(id, 1, int64(48+k)*testBlock, pattern(fmt.Sprintf("c%d|", k), testBlock))
				}
				c.requestCheckpoint()
				if err := c.Broken(); err != nil {
					t.Fatalf("replica broken after one failed sync that rewriting repaired: %v", err)
				}
				tc.replicasConverge(id, []uint64{1})
				return
			}
			succeedsSoon(t, 30*time.Second, func() error {
				if c.Broken() == nil {
					return fmt.Errorf("replica not broken after the sync failed again")
				}
				return nil
			})
			st, err := c.Status(context.Background())
			if err != nil || st.Broken == "" || c.IsLeader() {
				t.Fatalf("broken replica's status %+v (err %v), leader %v", st, err, c.IsLeader())
			}
			// The copyset goes on with the other two.
			tc.writeRetry(id, 1, 0, pattern("after|", testBlock))
		})
	}
}
