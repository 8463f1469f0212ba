package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/copyset/transport"

	"cairn.io/cairn/internal/soon"
)

var errorsIs = errors.Is

func pattern(tag string, n int) []byte {
	return bytes.Repeat([]byte(tag), n/len(tag)+1)[:n]
}

// replicasConverge waits until every running member of a copyset has
// applied the same index and holds identical data in the given range.
func (tc *testCluster) replicasConverge(id GroupID, chunks []uint64) {
	tc.t.Helper()
	soon.Succeeds(tc.t, 30*time.Second, func() error {
		var ref []byte
		var refIdx uint64
		for i, n := range tc.running() {
			c, err := n.engine.Get(id)
			if err != nil {
				continue
			}
			var all []byte
			for _, ch := range chunks {
				buf := make([]byte, testChunkSize)
				if err := c.Store().ReadAt(ch, buf, 0); err != nil && !isNotExist(err) {
					return err
				}
				all = append(all, buf...)
			}
			if i == 0 || ref == nil {
				ref, refIdx = all, c.AppliedIndex()
				continue
			}
			if c.AppliedIndex() != refIdx {
				return fmt.Errorf("node %d applied %d, another %d; %s", n.id, c.AppliedIndex(), refIdx, tc.describe(id))
			}
			if !bytes.Equal(all, ref) {
				return fmt.Errorf("node %d holds different chunk data", n.id)
			}
		}
		return nil
	})
}

func TestWriteReadReplicated(t *testing.T) {
	tc := newTestCluster(t, 3, 32, nil)
	id := MakeGroupID(1, 7)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	a := pattern("alpha", 8192)
	b := pattern("bravo", 4096)
	tc.writeRetry(id, 11, 0, a)
	tc.writeRetry(id, 11, 4096, b) // overwrite the second half
	tc.writeRetry(id, 12, testChunkSize-4096, a[:4096])
	got := tc.readRetry(id, 11, 0, 8192)
	want := append(append([]byte{}, a[:4096]...), b...)
	if !bytes.Equal(got, want) {
		t.Fatalf("read back differs")
	}
	if got := tc.readRetry(id, 12, 0, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("never-written range of a chunk is not zero")
	}
	if got := tc.readRetry(id, 99, 0, 512); !bytes.Equal(got, make([]byte, 512)) {
		t.Fatalf("missing chunk read as non-zero")
	}
	tc.replicasConverge(id, []uint64{11, 12})

	// Delete goes through the log too.
	leader := tc.leader(id)
	if _, err := deleteWait(context.Background(), leader, 11, 1, 1); err != nil {
		t.Fatal(err)
	}
	tc.replicasConverge(id, []uint64{11, 12})
	for _, n := range tc.running() {
		c, _ := n.engine.Get(id)
		for _, ch := range c.Store().List() {
			if ch == 11 {
				t.Fatalf("node %d still holds deleted chunk 11", n.id)
			}
		}
	}
}

func TestFollowerRefusesProposalsAndReads(t *testing.T) {
	tc := newTestCluster(t, 3, 16, nil)
	id := MakeGroupID(1, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	leader := tc.leader(id)
	// Followers learn the new leader from its first message.
	soon.Succeeds(t, 10*time.Second, func() error {
		for _, n := range tc.running() {
			if c, _ := n.engine.Get(id); c.Leader() != leader.e.cfg.NodeID {
				return fmt.Errorf("node %d does not know the leader yet", n.id)
			}
		}
		return nil
	})
	for _, n := range tc.running() {
		c, _ := n.engine.Get(id)
		if c == leader {
			continue
		}
		_, err := writeWait(context.Background(), c, 1, 1, 1, 0, make([]byte, 512))
		var nl *NotLeaderError
		if !errors.As(err, &nl) || nl.Leader != leader.e.cfg.NodeID {
			t.Fatalf("write on follower %d: %v, want NotLeaderError naming %d", n.id, err, leader.e.cfg.NodeID)
		}
		if err := c.Read(context.Background(), 1, 0, make([]byte, 512)); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("read on follower %d: %v", n.id, err)
		}
	}
}

func TestRestartKeepsData(t *testing.T) {
	tc := newTestCluster(t, 3, 32, nil)
	ids := []GroupID{MakeGroupID(1, 1), MakeGroupID(1, 2)}
	tc.create(ids, []uint64{1, 2, 3})
	for i, id := range ids {
		for k := 0; k < 20; k++ {
			tc.writeRetry(id, uint64(k%3), int64(k*testBlock), pattern(fmt.Sprintf("%d-%d|", i, k), testBlock))
		}
	}
	// Clean stop of everything, then a start from disk.
	for _, n := range tc.running() {
		tc.stop(n.id, false, 0)
	}
	for id := uint64(1); id <= 3; id++ {
		tc.start(id)
	}
	for i, id := range ids {
		for k := 0; k < 20; k++ {
			got := tc.readRetry(id, uint64(k%3), int64(k*testBlock), testBlock)
			if want := pattern(fmt.Sprintf("%d-%d|", i, k), testBlock); !bytes.Equal(got, want) {
				t.Fatalf("copyset %s block %d lost after restart", id, k)
			}
		}
	}
}

// TestCrashLosesNothingAcknowledged cuts the power of every replica at
// once in the middle of a write load, on disks that lose everything not
// fsynced (all of it, or a random part: partial writeback), restarts them
// and checks every block for the exact value of its last acknowledged write.
// Each block has one writer at a time, so its history is a sequence; the
// only other value it may hold is that of the one write whose outcome the
// crash left unknown.
func TestCrashLosesNothingAcknowledged(t *testing.T) {
	for round, keep := range []float64{0, 0.5} {
		t.Run(fmt.Sprint("keep=", keep), func(t *testing.T) {
			tc := newCrashableCluster(t, 3, 48, nil)
			id := MakeGroupID(2, uint32(round+1))
			tc.create([]GroupID{id}, []uint64{1, 2, 3})
			leader := tc.leader(id)

			const writers, perWriter = 8, 6
			type block struct {
				acked   string // value of the last acknowledged write ("" none)
				unknown string // value of a write whose outcome is unknown
			}
			var mu sync.Mutex
			blocks := make([]block, writers*perWriter)
			acks := 0
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for k := 0; ctx.Err() == nil; k++ {
						b := w*perWriter + k%perWriter
						tag := fmt.Sprintf("w%d-%d|", w, k)
						wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
						_, err := writeWait(wctx, leader, 5, 1, 1, int64(b)*testBlock, pattern(tag, testBlock))
						wcancel()
						mu.Lock()
						if err != nil {
							// Unknown outcome: this writer stops, so the block
							// has at most one write that may or may not land.
							blocks[b].unknown = tag
							mu.Unlock()
							return
						}
						blocks[b].acked = tag
						acks++
						mu.Unlock()
					}
				}()
			}
			soon.Succeeds(t, 30*time.Second, func() error {
				mu.Lock()
				defer mu.Unlock()
				if acks < 150 {
					return fmt.Errorf("%d writes acknowledged", acks)
				}
				return nil
			})
			tc.crashAll(keep)
			cancel()
			wg.Wait()
			for n := uint64(1); n <= 3; n++ {
				tc.start(n)
			}
			for b, want := range blocks {
				got := tc.readRetry(id, 5, int64(b)*testBlock, testBlock)
				switch {
				case want.acked != "" && bytes.Equal(got, pattern(want.acked, testBlock)):
				case want.unknown != "" && bytes.Equal(got, pattern(want.unknown, testBlock)):
				case want.acked == "" && bytes.Equal(got, make([]byte, testBlock)):
				default:
					t.Fatalf("block %d: last acknowledged write %q (unknown outcome: %q), read %.16q", b, want.acked, want.unknown, got)
				}
			}
		})
	}
}

// describe formats every replica's status of a copyset, for failures.
func (tc *testCluster) describe(id GroupID) string {
	var b bytes.Buffer
	for _, n := range tc.running() {
		c, err := n.engine.Get(id)
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := c.Status(ctx)
		cancel()
		c.amu.Lock()
		q, sched := len(c.applyQ), c.asched
		c.amu.Unlock()
		fmt.Fprintf(&b, "\n  node %d: %+v err=%v applyQ=%d asched=%+v installing=%v", n.id, st, err, q, sched, c.installing.Load())
	}
	return b.String()
}

// allApplied waits until every running replica of each copyset has applied
// the same index. On timeout it names every lagging copyset with its
// leader and each node's applied index, and each node's transport
// counters: a stuck link shows as every copyset of one leader lagging on
// one follower, a stuck copyset as one line.
func (tc *testCluster) allApplied(ids []GroupID, d time.Duration) {
	tc.t.Helper()
	deadline := time.Now().Add(d)
	for {
		var lag []string
		var first GroupID
		for _, id := range ids {
			var row []string
			idx := map[uint64]bool{}
			for _, n := range tc.running() {
				c, err := n.engine.Get(id)
				if err != nil {
					continue
				}
				a := c.AppliedIndex()
				idx[a] = true
				mark := ""
				if c.IsLeader() {
					mark = "*"
				}
				row = append(row, fmt.Sprintf("%d%s=%d", n.id, mark, a))
			}
			if len(idx) > 1 {
				if lag == nil {
					first = id
				}
				slices.Sort(row)
				lag = append(lag, fmt.Sprintf("  %s: %s", id, strings.Join(row, " ")))
			}
		}
		if len(lag) == 0 {
			return
		}
		if time.Now().After(deadline) {
			var stats []string
			for _, n := range tc.running() {
				stats = append(stats, fmt.Sprintf("  node %d: %+v", n.id, n.engine.TransportStats()))
				if tr, ok := n.engine.transport.(*transport.Transport); ok {
					for _, l := range tr.Lanes() {
						stats = append(stats, fmt.Sprintf("  node %d lane %s to %d: %+v", n.id, l.Lane, l.To, l))
					}
				}
			}
			slices.Sort(stats)
			tc.t.Fatalf("after %s, %d of %d copysets have replicas at different applied indexes (node=applied, * leads):\n%s\ntransport:\n%s\nfirst lagging copyset:%s\nworkers:\n%s",
				d, len(lag), len(ids), strings.Join(lag, "\n"), strings.Join(stats, "\n"), tc.describe(first), workerStacks())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestGoroutinesFlat shows that goroutines do not grow with copysets: no
// copyset owns a goroutine.
func TestGoroutinesFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("creates a thousand copysets")
	}
	tc := newTestCluster(t, 1, 8, func(c *Config) { c.TickInterval = 50 * time.Millisecond })
	n := tc.node(1)
	create := func(from, to int) {
		for i := from; i < to; i++ {
			if err := n.engine.Create(MakeGroupID(3, uint32(i)), []uint64{1}); err != nil {
				t.Fatal(err)
			}
		}
		soon.Succeeds(t, 60*time.Second, func() error {
			for _, c := range n.engine.List() {
				if !c.IsLeader() {
					return fmt.Errorf("copyset %s has no leader yet", c.ID())
				}
			}
			return nil
		})
	}
	create(0, 10)
	time.Sleep(200 * time.Millisecond)
	at10 := runtime.NumGoroutine()
	create(10, 1000)
	time.Sleep(200 * time.Millisecond)
	at1000 := runtime.NumGoroutine()
	t.Logf("goroutines: %d with 10 copysets, %d with 1000", at10, at1000)
	if at1000 > at10+10 {
		t.Fatalf("goroutines grew from %d to %d going from 10 to 1000 copysets", at10, at1000)
	}
	// And they all work.
	c, _ := n.engine.Get(MakeGroupID(3, 999))
	if _, err := writeWait(context.Background(), c, 1, 1, 1, 0, make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
}

// workerStacks returns the stacks of the goroutines running Raft and apply
// workers, to show what holds them when copysets stop moving.
func workerStacks() string {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		busy := strings.Contains(g, "applyWorker") || strings.Contains(g, "raftWorker") || strings.Contains(g, "(*Engine).ticker")
		if busy && !strings.Contains(g, "(*workQueue).pop") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
