package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/internal/soon"
)

// volumeModel is what a volume's chunks and snapshots must read as, on
// every replica.
type volumeModel struct {
	sn      uint64
	live    []uint64
	current map[uint64][]byte
	snaps   map[uint64]map[uint64][]byte
}

func (m *volumeModel) seq() Seq {
	s := Seq{SN: m.sn}
	if n := len(m.live); n > 0 {
		s.Keep = m.live[n-1]
	}
	return s
}

// seqDriver runs random sequenced writes, snapshots and snapshot deletions
// (with their trims) against a copyset through its leader.
type seqDriver struct {
	t      *testing.T
	tc     *testCluster
	id     GroupID
	m      *volumeModel
	rng    *rand.Rand
	chunks []uint64
}

// propose retries f through leader changes until it is applied.
func (d *seqDriver) propose(f func(ctx context.Context, c *Copyset) (*Proposal, error)) {
	d.t.Helper()
	soon.Succeeds(d.t, 30*time.Second, func() error {
		c := d.tc.leader(d.id)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		p, err := f(ctx, c)
		if err != nil {
			return err
		}
		_, err = p.Wait(ctx)
		return err
	})
}

func (d *seqDriver) step() {
	m := d.m
	switch r := d.rng.IntN(100); {
	case r < 70:
		chunk := d.chunks[d.rng.IntN(len(d.chunks))]
		off := int64(d.rng.IntN(testChunkSize/512)) * 512
		n := min(int64(1+d.rng.IntN(16))*512, testChunkSize-off)
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(d.rng.Uint32())
		}
		seq := m.seq()
		d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
			return c.ProposeSeqWrite(ctx, nil, ClientRequest{}, chunk, 1, 1, seq, off, data)
		})
		if m.current[chunk] == nil {
			m.current[chunk] = make([]byte, testChunkSize)
		}
		copy(m.current[chunk][off:], data)
	case r < 85 && len(m.live) < 4:
		m.live = append(m.live, m.sn)
		m.snaps[m.sn] = map[uint64][]byte{}
		for ch, b := range m.current {
			m.snaps[m.sn][ch] = bytes.Clone(b)
		}
		m.sn++
	case len(m.live) > 0:
		drop := m.live[d.rng.IntN(len(m.live))]
		m.live = slices.DeleteFunc(slices.Clone(m.live), func(x uint64) bool { return x == drop })
		delete(m.snaps, drop)
		for _, chunk := range d.chunks {
			live, bound := slices.Clone(m.live), m.sn
			d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
				return c.ProposeTrim(ctx, nil, chunk, 1, 1, live, bound)
			})
		}
	}
}

// check waits until every running replica applied what the leader did,
// then reads every live snapshot and the current data of every chunk from
// each replica's own store.
func (d *seqDriver) check(when string) {
	d.t.Helper()
	d.propose(func(ctx context.Context, c *Copyset) (*Proposal, error) {
		return c.ProposeWrite(ctx, nil, ClientRequest{}, 999, 1, 1, 0, make([]byte, 512))
	})
	target := d.tc.leader(d.id).AppliedIndex()
	got := make([]byte, testChunkSize)
	for _, n := range d.tc.running() {
		c, err := n.engine.Get(d.id)
		if err != nil {
			d.t.Fatal(err)
		}
		soon.Succeeds(d.t, 30*time.Second, func() error {
			if a := c.AppliedIndex(); a < target {
				return fmt.Errorf("node %d applied %d of %d", n.id, a, target)
			}
			return nil
		})
		for _, chunk := range d.chunks {
			for _, snap := range d.m.live {
				want := d.m.snaps[snap][chunk]
				if want == nil {
					want = make([]byte, testChunkSize)
				}
				err := c.Store().ReadAtSN(chunk, got, 0, snap)
				if errors.Is(err, datastore.ErrChunkNotExist) {
					clear(got)
					err = nil
				}
				if err != nil || !bytes.Equal(got, want) {
					d.t.Fatalf("%s: node %d, chunk %d at snapshot %d: err %v, equal %v", when, n.id, chunk, snap, err, bytes.Equal(got, want))
				}
			}
			if want := d.m.current[chunk]; want != nil {
				if err := c.Store().ReadAt(chunk, got, 0); err != nil || !bytes.Equal(got, want) {
					d.t.Fatalf("%s: node %d, chunk %d: err %v, equal %v", when, n.id, chunk, err, bytes.Equal(got, want))
				}
			}
		}
	}
}

// TestSnapshotsAreReplicated: sequenced writes keep what the volume's
// snapshots need on every replica alike (copy on write through Raft); the
// leader serves snapshot reads; a power cut of every replica with partial
// writeback loses nothing of it; and a replica that was down catches up by
// a Raft snapshot that carries the kept versions.
func TestSnapshotsAreReplicated(t *testing.T) {
	tc := newCrashableCluster(t, 3, 96, func(c *Config) {
		c.RetainBytes = 64 << 10
	})
	id := MakeGroupID(4, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	// Sequence numbers that make no sense are refused before the log.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	if _, err := tc.leader(id).ProposeSeqWrite(ctx, nil, ClientRequest{}, 1, 1, 1, Seq{SN: 3, Keep: 3}, 0, make([]byte, 512)); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("write whose newest snapshot is not before it: %v", err)
	}
	if _, err := tc.leader(id).ProposeTrim(ctx, nil, 1, 1, 1, []uint64{2, 5}, 5); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("trim listing a snapshot at its bound: %v", err)
	}
	cancel()
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	d := &seqDriver{t: t, tc: tc, id: id, rng: rand.New(rand.NewPCG(seed, 1)), chunks: []uint64{1, 2, 3},
		m: &volumeModel{sn: 1, current: map[uint64][]byte{}, snaps: map[uint64]map[uint64][]byte{}}}
	for range 120 {
		d.step()
	}
	d.check("after the load")

	// The leader serves a snapshot read.
	if len(d.m.live) > 0 {
		snap := d.m.live[0]
		got := make([]byte, 4096)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := tc.leader(id).ReadSnapshot(ctx, 1, 0, got, snap)
		cancel()
		want := make([]byte, 4096)
		if b := d.m.snaps[snap][1]; b != nil {
			want = b[:4096]
		}
		if err != nil && !errors.Is(err, datastore.ErrChunkNotExist) || err == nil && !bytes.Equal(got, want) {
			t.Fatalf("leader's read of snapshot %d: %v", snap, err)
		}
	}

	tc.crashAll(0.5)
	for n := uint64(1); n <= 3; n++ {
		tc.start(n)
	}
	d.check("after a power cut of every replica")

	// A replica misses copies on write and snapshot deletions, and comes
	// back after the others compacted their logs.
	late := uint64(3)
	if l := tc.leader(id); l.e.cfg.NodeID == late {
		if err := l.TransferLeader(context.Background(), 1, l.ConfEpoch()); err != nil {
			t.Fatal(err)
		}
	}
	tc.stop(late, false, 0)
	for range 120 {
		d.step()
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
		if st.FirstIndex < 200 {
			return fmt.Errorf("leader's log still starts at %d", st.FirstIndex)
		}
		return nil
	})
	tc.start(late)
	d.check("after the late replica caught up")
}
