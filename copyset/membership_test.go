package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
)

// loadGen writes to a copyset continuously, each writer owning its blocks,
// and remembers the last acknowledged value of every block (and the one in
// flight, whose outcome may be unknown).
type loadGen struct {
	tc     *testCluster
	id     GroupID
	mu     sync.Mutex
	last   map[int64][]byte
	maybe  map[int64][]byte
	acked  int
	stop   chan struct{}
	wg     sync.WaitGroup
	chunks int
}

func startLoad(tc *testCluster, id GroupID, writers, chunks int) *loadGen {
	g := &loadGen{tc: tc, id: id, last: map[int64][]byte{}, maybe: map[int64][]byte{}, stop: make(chan struct{}), chunks: chunks}
	for w := 0; w < writers; w++ {
		g.wg.Add(1)
		go func(w int) {
			defer g.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-g.stop:
					return
				default:
				}
				slot := int64(i%64*writers + w)
				chunk := uint64(slot) % uint64(chunks)
				off := (slot / int64(chunks)) * testBlock % testChunkSize
				key := int64(chunk)<<32 | off
				data := pattern(fmt.Sprintf("w%d-%d|", w, i), testBlock)
				g.mu.Lock()
				g.maybe[key] = data
				g.mu.Unlock()
				var c *Copyset
				for _, n := range tc.running() {
					if cs, err := n.engine.Get(id); err == nil && cs.IsLeader() {
						c = cs
					}
				}
				if c == nil {
					time.Sleep(5 * time.Millisecond)
					continue
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, err := writeWait(ctx, c, chunk, 1, 1, off, data)
				cancel()
				g.mu.Lock()
				if err == nil {
					g.last[key], g.maybe[key] = data, nil
					g.acked++
				} else if errors.Is(err, ErrNotLeader) || errors.Is(err, ErrProposalLost) {
					g.maybe[key] = nil
				}
				g.mu.Unlock()
			}
		}(w)
	}
	return g
}

func (g *loadGen) ackedCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.acked
}

// progress waits until n more writes were acknowledged.
func (g *loadGen) progress(t *testing.T, n int) {
	t.Helper()
	start := g.ackedCount()
	soon.Succeeds(t, 30*time.Second, func() error {
		if got := g.ackedCount() - start; got < n {
			return fmt.Errorf("only %d writes acknowledged", got)
		}
		return nil
	})
}

// finish stops the load and checks every block through the leader.
func (g *loadGen) finish(t *testing.T) {
	t.Helper()
	close(g.stop)
	g.wg.Wait()
	g.mu.Lock()
	defer g.mu.Unlock()
	for key, want := range g.last {
		got := g.tc.readRetry(g.id, uint64(key>>32), key&0xffffffff, testBlock)
		if !bytes.Equal(got, want) && (g.maybe[key] == nil || !bytes.Equal(got, g.maybe[key])) {
			t.Fatalf("block %x: read %.12q, last acknowledged %.12q", key, got, want)
		}
	}
}

func (tc *testCluster) voters(id GroupID) []uint64 {
	c := tc.leader(id)
	return append([]uint64(nil), c.ConfState().GetVoters()...)
}

// TestMembershipUnderLoad adds a fourth replica to a copyset that holds
// data and is being written (it arrives by snapshot, then catches up from
// the log), removes an original one, and moves leadership around, all
// while writers keep going; nothing acknowledged may be lost and the final
// members must hold identical chunks.
func TestMembershipUnderLoad(t *testing.T) {
	tc := newTestCluster(t, 4, 64, func(c *Config) {
		c.CheckpointBytes = 128 << 10 // compact early: the new replica needs a snapshot
		c.RetainBytes = 64 << 10
		c.SnapshotBytesPerSec = 8 << 20
	})
	id := MakeGroupID(4, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	load := startLoad(tc, id, 6, 8)
	load.progress(t, 300)

	// Add node 4: it starts empty and is filled by a snapshot.
	if err := tc.node(4).engine.Create(id, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	soon.Succeeds(t, 60*time.Second, func() error {
		l := tc.leader(id)
		return l.AddPeer(ctx, 4, l.ConfEpoch())
	})
	if v := tc.voters(id); !slices.Equal(v, []uint64{1, 2, 3, 4}) {
		t.Fatalf("voters after add: %v", v)
	}
	c4, _ := tc.node(4).engine.Get(id)
	if len(c4.Store().List()) == 0 {
		t.Fatal("the new replica holds no chunks")
	}
	load.progress(t, 100)

	// A stale operator is refused and changes nothing.
	l := tc.leader(id)
	if err := l.RemovePeer(ctx, 1, l.ConfEpoch()-1); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("remove with a stale epoch: %v", err)
	}

	// Move leadership to the new replica, then remove node 1.
	soon.Succeeds(t, 60*time.Second, func() error {
		l := tc.leader(id)
		if l.e.cfg.NodeID == 4 {
			return nil
		}
		tctx, tcancel := context.WithTimeout(ctx, 5*time.Second)
		defer tcancel()
		return l.TransferLeader(tctx, 4, l.ConfEpoch())
	})
	load.progress(t, 100)
	soon.Succeeds(t, 60*time.Second, func() error {
		l := tc.leader(id)
		return l.RemovePeer(ctx, 1, l.ConfEpoch())
	})
	if v := tc.voters(id); !slices.Equal(v, []uint64{2, 3, 4}) {
		t.Fatalf("voters after remove: %v", v)
	}
	load.progress(t, 100)
	load.finish(t)

	// The removed node stops counting; the others converge.
	tc.stop(1, false, 0)
	var chunks []uint64
	for i := 0; i < 8; i++ {
		chunks = append(chunks, uint64(i))
	}
	tc.replicasConverge(id, chunks)
	st, err := tc.leader(id).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.ConfEpoch == 0 || len(st.Voters) != 3 {
		t.Fatalf("status after the changes: %+v", st)
	}
}

// TestRestartedReplicaCatchesUpBySnapshot stops a follower, writes far
// past what the leader retains, and restarts it: it must be brought back by
// a snapshot and end with the same chunks. Over loopback sockets and over
// the in-memory network.
func TestRestartedReplicaCatchesUpBySnapshot(t *testing.T) {
	t.Run("sockets", func(t *testing.T) { testCatchUpBySnapshot(t, newTestCluster) })
	t.Run("memory", func(t *testing.T) { testCatchUpBySnapshot(t, newMemoryCluster) })
}

func testCatchUpBySnapshot(t *testing.T, newCluster func(testing.TB, int, int, func(*Config)) *testCluster) {
	tc := newCluster(t, 3, 48, func(c *Config) {
		c.CheckpointBytes = 64 << 10
		c.RetainBytes = 32 << 10
		// The leader keeps the log for a follower it heard from within an
		// election timeout; the writes below may take less than that.
		c.MaxFollowerLagBytes = 32 << 10
	})
	id := MakeGroupID(5, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	l := tc.leader(id)
	var follower uint64
	for _, n := range tc.running() {
		if n.id != l.e.cfg.NodeID {
			follower = n.id
			break
		}
	}
	tc.writeRetry(id, 1, 0, pattern("before|", testBlock))
	tc.stop(follower, false, 0)
	for i := 0; i < 200; i++ {
		tc.writeRetry(id, uint64(i%6), int64(i%60)*testBlock, pattern(fmt.Sprintf("while-down-%d|", i), testBlock))
	}
	if _, err := deleteWait(context.Background(), tc.leader(id), 1, 1, 1); err != nil {
		t.Fatal(err)
	}
	tc.start(follower)
	tc.replicasConverge(id, []uint64{0, 1, 2, 3, 4, 5})
	c, _ := tc.node(follower).engine.Get(id)
	if slices.Contains(c.Store().List(), 1) {
		t.Fatal("the caught-up replica kept a chunk deleted while it was down")
	}
	// The metrics saw it: one install here, a send from the leader's node.
	if got := tc.node(follower).engine.SnapshotStats(); got.Installed == 0 {
		t.Fatalf("snapshot stats of the caught-up replica: %+v", got)
	}
	sent := uint64(0)
	for _, n := range tc.running() {
		sent += n.engine.SnapshotStats().Sent
	}
	if sent == 0 {
		t.Fatal("no node counted the snapshot it sent")
	}
}
