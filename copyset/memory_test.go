package copyset

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
)

// TestProposalsWaitForTheByteBudget floods one chunkserver's copysets with
// large concurrent writes under a small budget: every write succeeds (the
// budget makes proposals wait, it fails none) and the bytes admitted never
// exceed the budget.
func TestProposalsWaitForTheByteBudget(t *testing.T) {
	const budget = 1 << 20
	tc := newTestCluster(t, 3, 64, func(c *Config) { c.MaxInflightBytes = budget })
	ids := []GroupID{MakeGroupID(4, 1), MakeGroupID(4, 2)}
	tc.create(ids, []uint64{1, 2, 3})
	leaders := map[GroupID]*Copyset{}
	for _, id := range ids {
		leaders[id] = tc.leader(id)
	}
	var peak atomic.Int64
	stop := make(chan struct{})
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		for {
			for _, n := range tc.running() {
				if v := n.engine.InflightBytes(); v > peak.Load() {
					peak.Store(v)
				}
			}
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := ids[w%len(ids)]
			for k := range 4 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				_, err := writeWait(ctx, leaders[id], uint64(w%4), 1, 1, int64((w/4*4+k)%8)*(32<<10), pattern(fmt.Sprintf("m%d-%d|", w, k), 32<<10))
				cancel()
				if err != nil {
					errs <- fmt.Errorf("writer %d: %w", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	watch.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if p := peak.Load(); p > budget || p == 0 {
		t.Fatalf("peak bytes admitted %d, budget %d", p, budget)
	}
	for _, n := range tc.running() {
		if v := n.engine.InflightBytes(); v != 0 {
			t.Fatalf("node %d still counts %d bytes in flight after every write returned", n.id, v)
		}
	}
}

// TestLogMemoryIsBoundedInBytes writes large entries into several copysets
// and checks that what their in-memory logs hold, counted from the logs
// themselves, falls under MaxLogBytes once the load stops, and that the
// engine's account of it is exact.
func TestLogMemoryIsBoundedInBytes(t *testing.T) {
	const limit = 2 << 20
	tc := newTestCluster(t, 3, 96, func(c *Config) {
		c.MaxLogBytes = limit
		c.CheckpointBytes = 64 << 20 // only memory pressure checkpoints
		c.CheckpointInterval = time.Hour
		c.RetainBytes = 1 << 20
	})
	var ids []GroupID
	for i := range 4 {
		ids = append(ids, MakeGroupID(5, uint32(i+1)))
	}
	tc.create(ids, []uint64{1, 2, 3})
	for _, id := range ids {
		for k := range 24 {
			tc.writeRetry(id, uint64(k%3), int64(k%4)*(48<<10), pattern(fmt.Sprintf("L%d|", k), 48<<10))
		}
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		for _, n := range tc.running() {
			held := trueLogBytes(t, n)
			if got := n.engine.LogBytes(); got != held {
				detail := ""
				for _, c := range n.engine.List() {
					var tb int64
					var fi, li uint64
					_ = c.callWait(context.Background(), func() {
						fi, _ = c.storage.FirstIndex()
						li, _ = c.storage.LastIndex()
						ents, _ := c.storage.Entries(fi, li+1, math.MaxUint64)
						for _, e := range ents {
							tb += int64(entryBytes(e))
						}
					})
					detail += fmt.Sprintf(" %s: acct %d true %d [%d,%d]", c.id, c.memLog.Load(), tb, fi, li)
				}
				return fmt.Errorf("node %d accounts %d log bytes, its logs hold %d:%s", n.id, got, held, detail)
			}
			if held > limit {
				return fmt.Errorf("node %d holds %d bytes of log entries, limit %d", n.id, held, limit)
			}
		}
		return nil
	})
}

// trueLogBytes sums the entries every copyset of a node holds in memory.
func trueLogBytes(t *testing.T, n *testNode) int64 {
	t.Helper()
	var total int64
	for _, c := range n.engine.List() {
		err := c.callWait(context.Background(), func() {
			first, _ := c.storage.FirstIndex()
			last, _ := c.storage.LastIndex()
			if last < first {
				return
			}
			ents, err := c.storage.Entries(first, last+1, math.MaxUint64)
			if err != nil {
				t.Errorf("read log of %s: %v", c.id, err)
				return
			}
			for _, e := range ents {
				total += int64(entryBytes(e))
			}
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return total
}
