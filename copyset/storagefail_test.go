package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/faultfs"
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
			soon.Succeeds(t, 30*time.Second, func() error {
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
			soon.Succeeds(t, 30*time.Second, func() error {
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

// TestFailedWALStopsEveryCopysetOfTheChunkServer: the shared write-ahead
// log's fdatasync fails on the chunkserver that leads a copyset. It must not
// go on heartbeating as a leader that can commit nothing: every copyset of
// the chunkserver stops, its owner is told (the daemon exits and restarts),
// and the copyset elects a leader elsewhere and takes writes again.
func TestFailedWALStopsEveryCopysetOfTheChunkServer(t *testing.T) {
	failed := make(chan error, 3)
	tc := newCrashableCluster(t, 3, 32, func(c *Config) {
		c.OnStorageFailure = func(err error) { failed <- err }
	})
	ids := []GroupID{MakeGroupID(10, 1), MakeGroupID(10, 2)}
	tc.create(ids, []uint64{1, 2, 3})
	tc.writeRetry(ids[0], 1, 0, pattern("before|", testBlock))
	victim := tc.leader(ids[0]).e.cfg.NodeID
	if _, err := tc.disks[victim].FailSync(`^cs[0-9]+/engine/wal/`, 1); err != nil {
		t.Fatal(err)
	}
	// The next write makes the WAL sync, and fail; a new leader takes it.
	tc.writeRetry(ids[0], 1, testBlock, pattern("after|", testBlock))
	select {
	case err := <-failed:
		t.Logf("storage failure reported: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the WAL failure was not reported")
	}
	for _, id := range ids {
		c, err := tc.node(victim).engine.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if c.Broken() == nil || c.IsLeader() {
			t.Fatalf("copyset %s on the failed chunkserver: broken %v, leader %v", id, c.Broken(), c.IsLeader())
		}
		if l := tc.leader(id); l.e.cfg.NodeID == victim {
			t.Fatalf("copyset %s still led by the failed chunkserver", id)
		}
	}
	if got := tc.readRetry(ids[0], 1, 0, 2*testBlock); string(got[:7]) != "before|" || string(got[testBlock:testBlock+6]) != "after|" {
		t.Fatalf("read %.8q ... %.8q", got[:8], got[testBlock:testBlock+8])
	}
}

// TestReadsWaitForARewriteFromTheLog: while a leader rewrites its chunk
// files from its log after their sync failed, the files go back to the
// last checkpoint and forward again; a read in between must wait for the
// rewrite instead of returning a value older than the last acknowledged
// write.
func TestReadsWaitForARewriteFromTheLog(t *testing.T) {
	paused, resume := make(chan uint64, 1), make(chan struct{})
	var rewriting atomic.Uint64 // the index to pause after, once known
	tc := newCrashableCluster(t, 3, 32, func(c *Config) {
		c.TestingKnobs.OnRewrite = func(_ GroupID, index uint64) {
			if index == rewriting.Load() {
				paused <- index
				<-resume
			}
		}
	})
	id := MakeGroupID(9, 7)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	// Armed before the fault: a checkpoint of the leader's own may meet
	// the failing fdatasync at once.
	l, _ := versionsBeforeAFailingSync(t, tc, id, func(first uint64) { rewriting.Store(first) })
	ctx := context.Background()
	l.requestCheckpoint()
	select {
	case <-paused: // the leader's files hold v1 again, for now
	case <-time.After(30 * time.Second):
		t.Fatal("the leader did not rewrite its chunk files after the failed sync")
	}
	buf := make([]byte, testBlock)
	if err := l.Read(WithoutWaiting(ctx), 1, 0, buf); !errors.Is(err, ErrWouldWait) {
		close(resume)
		t.Fatalf("read without waiting during the rewrite: %v, want ErrWouldWait", err)
	}
	rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := l.Read(rctx, 1, 0, buf)
	cancel()
	if err == nil {
		close(resume)
		t.Fatalf("read during the rewrite returned %.8q; the last acknowledged write is %q", buf, "v3|")
	}
	close(resume)
	soon.Succeeds(t, 10*time.Second, func() error { return l.Read(ctx, 1, 0, buf) })
	if !bytes.Equal(buf, pattern("v3|", testBlock)) {
		t.Fatalf("read after the rewrite %.8q, want %q", buf, "v3|")
	}
	if err := l.Broken(); err != nil {
		t.Fatalf("leader broken by one failed sync: %v", err)
	}
}

// wrapStores has the engine open its chunk stores through wrap.
func wrapStores(c *Config, wrap func(ChunkStore) ChunkStore) {
	open := c.OpenStore
	c.OpenStore = func(d string) (ChunkStore, error) {
		s, err := open(d)
		if err != nil {
			return nil, err
		}
		return wrap(s), nil
	}
}

// pausingStore pauses once, when armed, after a Sync that failed, until
// resume is closed.
type pausingStore struct {
	ChunkStore
	armed  *atomic.Bool
	paused chan struct{}
	resume chan struct{}
}

func (s pausingStore) Sync(failed func()) error {
	err := s.ChunkStore.Sync(failed)
	if err != nil && s.armed.CompareAndSwap(true, false) {
		s.paused <- struct{}{}
		<-s.resume
	}
	return err
}

// TestReadsStopAtAFailedSync: from the moment a chunk's fdatasync fails
// (its file may be back at its last synced state: faultfs drops what was
// not synced), no read of the leader's files may be served until they are
// rewritten from the log, even while the store goes on syncing other
// chunks.
func TestReadsStopAtAFailedSync(t *testing.T) {
	var armed atomic.Bool
	paused, resume := make(chan struct{}, 1), make(chan struct{})
	tc := newCrashableCluster(t, 3, 32, func(c *Config) {
		wrapStores(c, func(s ChunkStore) ChunkStore { return pausingStore{s, &armed, paused, resume} })
	})
	id := MakeGroupID(9, 8)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	l, _ := versionsBeforeAFailingSync(t, tc, id, func(uint64) { armed.Store(true) })
	ctx := context.Background()
	l.requestCheckpoint()
	select {
	case <-paused:
	case <-time.After(30 * time.Second):
		t.Fatal("no failed sync")
	}
	buf := make([]byte, testBlock)
	rctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err := l.Read(rctx, 1, 0, buf)
	cancel()
	close(resume)
	if err == nil && !bytes.Equal(buf, pattern("v3|", testBlock)) {
		t.Fatalf("read between the failed sync and the rewrite returned %.8q; last acknowledged %q", buf, "v3|")
	}
}

// versionsBeforeAFailingSync writes v0 to block 0 of chunk 1 through the
// copyset's leader, checkpoints, writes v1, v2 and v3 over it, calls arm
// with the index of v1's entry, and makes the next fdatasync of a chunk
// file on the leader's disk fail. It returns the leader and that index.
func versionsBeforeAFailingSync(t *testing.T, tc *testCluster, id GroupID, arm func(first uint64)) (*Copyset, uint64) {
	t.Helper()
	l := tc.leader(id)
	ctx := context.Background()
	if _, err := writeWait(ctx, l, 1, 1, 1, 0, pattern("v0|", testBlock)); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		l.requestCheckpoint()
		if l.ckptIndex.Load() < l.AppliedIndex() {
			return fmt.Errorf("checkpoint at %d, applied %d", l.ckptIndex.Load(), l.AppliedIndex())
		}
		return nil
	})
	var disk *faultfs.FS
	for _, n := range tc.running() {
		if c, err := n.engine.Get(id); err == nil && c == l {
			disk = tc.disks[n.id]
		}
	}
	for attempt := 1; ; attempt++ {
		first, err := writeWait(ctx, l, 1, 1, 1, 0, pattern("v1|", testBlock))
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range []string{"v2|", "v3|"} {
			if _, err := writeWait(ctx, l, 1, 1, 1, 0, pattern(v, testBlock)); err != nil {
				t.Fatal(err)
			}
		}
		arm(first)
		faults := disk.Stats().SyncFaults
		rule, err := disk.FailSync(`/chunks/chunk_`, 1)
		if err != nil {
			t.Fatal(err)
		}
		// A checkpoint of the leader's own (a WAL rollover or the memory bound asks for one)
		// may have synced v1..v3 before the rule was armed, leaving no
		// fdatasync to fail: write them again. One under way holds the
		// state machine; wait for it.
		l.smMu.Lock()
		ckpt := l.ckptIndex.Load()
		l.smMu.Unlock()
		if ckpt < first || disk.Stats().SyncFaults > faults || !disk.RemoveRule(rule) {
			return l, first
		}
		if attempt == 5 {
			t.Fatal("a checkpoint of the leader's own came before the fault five times")
		}
	}
}

// blockingReadStore holds the first ReadAt after it is armed, before it
// reads, until release is closed.
type blockingReadStore struct {
	ChunkStore
	armed   *atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (s blockingReadStore) ReadAt(id uint64, p []byte, off int64) error {
	if s.armed.CompareAndSwap(true, false) {
		close(s.entered)
		<-s.release
	}
	return s.ChunkStore.ReadAt(id, p, off)
}

// TestReadsInProgressAtAFailedSyncDoNotReturnThePast: a read that began
// before a chunk's fdatasync failed, and reads the file after the failure
// put it back at its last synced state, must not return what it read: it
// waits for the rewrite from the log and reads again.
func TestReadsInProgressAtAFailedSyncDoNotReturnThePast(t *testing.T) {
	var armed atomic.Bool
	entered, release := make(chan struct{}), make(chan struct{})
	tc := newCrashableCluster(t, 3, 32, func(c *Config) {
		wrapStores(c, func(s ChunkStore) ChunkStore { return blockingReadStore{s, &armed, entered, release} })
	})
	id := MakeGroupID(9, 9)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	l, _ := versionsBeforeAFailingSync(t, tc, id, func(uint64) {})
	var disk *faultfs.FS
	for _, n := range tc.running() {
		if c, err := n.engine.Get(id); err == nil && c == l {
			disk = tc.disks[n.id]
		}
	}
	ctx := context.Background()
	armed.Store(true)
	type result struct {
		data []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		buf := make([]byte, testBlock)
		err := l.Read(ctx, 1, 0, buf)
		done <- result{buf, err}
	}()
	select {
	case <-entered: // the read is under way: past the lease check, files held for reading
	case <-time.After(30 * time.Second):
		t.Fatal("the read did not reach the store")
	}
	// The checkpoint's fdatasync fails; the file is back at v0 from then on.
	l.requestCheckpoint()
	soon.Succeeds(t, 30*time.Second, func() error {
		if disk.Stats().SyncFaults == 0 {
			return errors.New("no failed fdatasync yet")
		}
		return nil
	})
	close(release)
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the read did not end")
	}
	if r.err != nil {
		t.Fatalf("read: %v", r.err)
	}
	if !bytes.Equal(r.data, pattern("v3|", testBlock)) {
		t.Fatalf("a read under way when the fdatasync failed returned %.8q; the last acknowledged write is %q", r.data, "v3|")
	}
	if err := l.Broken(); err != nil {
		t.Fatalf("leader broken by one failed sync: %v", err)
	}
}
