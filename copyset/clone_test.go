package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/internal/geometry"
	"cairn.io/cairn/internal/soon"
)

// TestCloneWritesAreReplicated: clone writes (partial pages with their
// fills, fills alone, unmaps), before and after a snapshot, leave every
// replica owning the same pages and reading, with the source where not
// owned, what the clone wrote, and the snapshot what it held;
// through a power cut of every replica with partial writeback, and on a
// replica that caught up by a Raft snapshot, which carries the owned
// pages. A clone write whose fill does not hold a page it covers in part
// is refused before the log.
func TestCloneWritesAreReplicated(t *testing.T) {
	tc := newCrashableCluster(t, 3, 96, func(c *Config) {
		c.RetainBytes = 64 << 10
	})
	id := MakeGroupID(4, 2)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	unit := geometry.CopyUnit(testChunkSize, 4096, 512)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if _, err := tc.leader(id).ProposeCloneWrite(ctx, nil, ClientRequest{}, 1, 1, 1, Seq{}, 512, make([]byte, 512), nil, 0); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("clone write of part of a page without its fill: %v", err)
	}
	if _, err := tc.leader(id).ProposeCloneWrite(ctx, nil, ClientRequest{}, 1, 1, 1, Seq{}, 0, nil, make([]byte, 512), 0); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("fill of part of a page: %v", err)
	}
	cancel()

	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 3))
	chunks := []uint64{1, 2, 3, 4, 5, 6, 7, 8} // 16 pages each: most stay partly owned
	src, want := map[uint64][]byte{}, map[uint64][]byte{}
	for _, c := range chunks {
		src[c] = make([]byte, testChunkSize)
		for i := range src[c] {
			src[c][i] = byte(rng.Uint32() | 1)
		}
		want[c] = bytes.Clone(src[c])
	}
	d := &seqDriver{t: t, tc: tc, id: id}
	// Writes under sequence number 1 until snapshot 1 is taken, then
	// under 2 (copy on write keeps, for a clone's chunk, which pages it
	// did not own).
	seq := Seq{SN: 1}
	var atSnap map[uint64][]byte
	step := func() {
		chunk := chunks[rng.IntN(len(chunks))]
		switch r := rng.IntN(100); {
		case r < 75:
			off := int64(rng.IntN(testChunkSize/512)) * 512
			n := min(int64(1+rng.IntN(16))*512, testChunkSize-off)
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			lo, hi := off/unit*unit, min((off+n+unit-1)/unit*unit, testChunkSize)
			fill := bytes.Clone(src[chunk][lo:hi])
			d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
				return c.ProposeCloneWrite(ctx, nil, ClientRequest{}, chunk, 1, 1, seq, off, data, fill, lo)
			})
			copy(want[chunk][off:], data)
		case r < 95:
			lo := int64(rng.IntN(testChunkSize/int(unit))) * unit
			hi := min(lo+int64(1+rng.IntN(4))*unit, testChunkSize)
			fill := bytes.Clone(src[chunk][lo:hi])
			d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
				return c.ProposeCloneWrite(ctx, nil, ClientRequest{}, chunk, 1, 1, seq, 0, nil, fill, lo)
			})
		default:
			d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
				return c.ProposeCloneZero(ctx, nil, ClientRequest{}, chunk, 1, 1, seq)
			})
			clear(want[chunk])
		}
	}
	check := func(when string) {
		t.Helper()
		d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
			return c.ProposeWrite(ctx, nil, ClientRequest{}, 999, 1, 1, 0, make([]byte, 512))
		})
		target := tc.leader(id).AppliedIndex()
		owned := map[uint64][]byte{}
		for _, n := range tc.running() {
			c, err := n.engine.Get(id)
			if err != nil {
				t.Fatal(err)
			}
			soon.Succeeds(t, 30*time.Second, func() error {
				if a := c.AppliedIndex(); a < target {
					return fmt.Errorf("node %d applied %d of %d", n.id, a, target)
				}
				return nil
			})
			for _, chunk := range chunks {
				got := make([]byte, testChunkSize)
				absent, err := c.Store().ReadOwned(chunk, got, 0)
				if errors.Is(err, datastore.ErrChunkNotExist) {
					continue // never written: reads the source
				}
				if err != nil {
					t.Fatalf("%s: node %d, chunk %d: %v", when, n.id, chunk, err)
				}
				for k := int64(0); k*unit < testChunkSize; k++ {
					if absent != nil && absent[k/8]&(1<<(k%8)) != 0 {
						copy(got[k*unit:(k+1)*unit], src[chunk][k*unit:])
					}
				}
				if !bytes.Equal(got, want[chunk]) {
					t.Fatalf("%s: node %d, chunk %d does not read what the clone wrote", when, n.id, chunk)
				}
				if atSnap != nil {
					absent, err := c.Store().ReadOwnedSN(chunk, got, 0, 1)
					if err != nil {
						t.Fatalf("%s: node %d, chunk %d at snapshot 1: %v", when, n.id, chunk, err)
					}
					for k := int64(0); k*unit < testChunkSize; k++ {
						if absent != nil && absent[k/8]&(1<<(k%8)) != 0 {
							copy(got[k*unit:(k+1)*unit], src[chunk][k*unit:])
						}
					}
					if !bytes.Equal(got, atSnap[chunk]) {
						t.Fatalf("%s: node %d, chunk %d at snapshot 1 does not read what the clone held", when, n.id, chunk)
					}
				}
				bits, _ := c.Store().Owned(chunk)
				if prev, ok := owned[chunk]; ok && !bytes.Equal(prev, bits) {
					t.Fatalf("%s: node %d, chunk %d owns other pages than another replica: %x vs %x", when, n.id, chunk, bits, prev)
				}
				owned[chunk] = bits
			}
		}
	}
	for range 60 {
		step()
	}
	check("after the load")
	// Snapshot 1.
	atSnap = map[uint64][]byte{}
	for _, c := range chunks {
		atSnap[c] = bytes.Clone(want[c])
	}
	seq = Seq{SN: 2, Keep: 1}
	for range 40 {
		step()
	}
	check("after writes under a snapshot")
	tc.crashAll(0.5)
	for n := uint64(1); n <= 3; n++ {
		tc.start(n)
	}
	check("after a power cut of every replica")

	late := uint64(3)
	if l := tc.leader(id); l.e.cfg.NodeID == late {
		if err := l.TransferLeader(context.Background(), 1, l.ConfEpoch()); err != nil {
			t.Fatal(err)
		}
	}
	stoppedAt := tc.leader(id).AppliedIndex()
	tc.stop(late, false, 0)
	for range 60 {
		step()
	}
	// Past the late replica's log, with filler entries the leader can
	// compact away.
	for range 150 {
		d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
			return c.ProposeWrite(ctx, nil, ClientRequest{}, 999, 1, 1, 0, make([]byte, 512))
		})
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		for _, n := range tc.running() {
			c, _ := n.engine.Get(id)
			c.requestCheckpoint()
		}
		st, err := tc.leader(id).Status(context.Background())
		if err != nil {
			return err
		}
		if st.FirstIndex <= stoppedAt+1 {
			return fmt.Errorf("leader's log still starts at %d, the late replica stopped at %d", st.FirstIndex, stoppedAt)
		}
		return nil
	})
	tc.start(late)
	check("after the late replica caught up")
	if st := tc.nodes[late].engine.SnapshotStats(); st.Installed == 0 {
		t.Fatal("the late replica caught up without a Raft snapshot")
	}
}
