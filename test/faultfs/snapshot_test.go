package faultfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"cairn.io/cairn/chunkserver/datastore"
)

// snapOp is one state-machine operation on a datastore, as a copyset's log
// would carry it: a sequenced write or a trim.
type snapOp struct {
	id       uint64
	off      int64
	data     []byte
	sn, keep uint64
	live     []uint64 // trim: the live snapshots below bound
	bound    uint64   // trim: the volume's sequence number then
	trim     bool
}

func (o snapOp) apply(s *datastore.Store) error {
	if o.trim {
		return s.Trim(o.id, o.live, o.bound)
	}
	return s.WriteAtSN(o.id, o.data, o.off, o.sn, o.keep)
}

// TestSnapshotVersionsSurviveCrashes runs copy-on-write writes, snapshots
// and snapshot deletions on a datastore in the mount, cuts the power, often
// at a version file's fdatasync (in the middle of a copy on write), with
// partial writeback, and then does what a copyset does after a crash:
// reopen and replay the operations since the last checkpoint (Sync). Every
// live snapshot then reads exactly what the chunks held when it was taken,
// and the chunks exactly their last data.
func TestSnapshotVersionsSurviveCrashes(t *testing.T) {
	f := MountForTest(t, Options{})
	const chunkSize = 64 << 10
	ts := testStore{t: t, f: f, initial: 32, most: 64}
	p, s := ts.open()

	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 5))
	ids := []uint64{1, 2, 3}
	sn := uint64(1)
	var live []uint64
	current := map[uint64][]byte{}
	snaps := map[uint64]map[uint64][]byte{}
	var log []snapOp // since the last checkpoint
	keep := func() uint64 {
		if len(live) == 0 {
			return 0
		}
		return live[len(live)-1]
	}
	// do logs an operation as committed, then applies it; an error means
	// the power was cut under it.
	do := func(o snapOp) error {
		log = append(log, o)
		if !o.trim {
			if current[o.id] == nil {
				current[o.id] = make([]byte, chunkSize)
			}
			copy(current[o.id][o.off:], o.data)
		}
		return o.apply(s)
	}
	check := func(round int) {
		t.Helper()
		got := make([]byte, chunkSize)
		for _, id := range ids {
			for _, snap := range live {
				want := snaps[snap][id]
				if want == nil {
					want = make([]byte, chunkSize)
				}
				err := s.ReadAtSN(id, got, 0, snap)
				if errors.Is(err, datastore.ErrChunkNotExist) {
					clear(got)
					err = nil
				}
				if err != nil || !bytes.Equal(got, want) {
					info, _ := s.Info(id)
					for i := 0; i < chunkSize; i += 4096 {
						if !bytes.Equal(got[i:i+4096], want[i:i+4096]) {
							t.Logf("page %d differs", i/4096)
						}
					}
					for _, o := range log {
						t.Logf("log: %+v", snapOp{id: o.id, off: o.off, sn: o.sn, keep: o.keep, live: o.live, trim: o.trim})
					}
					t.Fatalf("round %d: chunk %d at snapshot %d: err %v, equal %v; live %v; info %+v", round, id, snap, err, bytes.Equal(got, want), live, info)
				}
			}
			if want := current[id]; want != nil {
				if err := s.ReadAt(id, got, 0); err != nil || !bytes.Equal(got, want) {
					t.Fatalf("round %d: chunk %d current data: err %v, equal %v", round, id, err, bytes.Equal(got, want))
				}
			}
		}
	}

	cutsInCopy := 0
	const rounds = 120
	for round := range rounds {
		keepPages := rng.Float64()
		// Most rounds cut the power at a version file's fdatasync (inside
		// a copy on write, a version's creation or a merge); the others
		// between operations.
		var armed RuleID
		if rng.IntN(3) > 0 {
			var err error
			if armed, err = f.CrashAtSync(`^store/chunk_[0-9]+_snap_`, 1+rng.IntN(4), CrashOptions{Keep: keepPages, Seed: uint64(round)}); err != nil {
				t.Fatal(err)
			}
		}
		var opErr error
		for range 30 {
			var err error
			switch r := rng.IntN(100); {
			case r < 70:
				off := int64(rng.IntN(chunkSize/512)) * 512
				n := min(int64(1+rng.IntN(20))*512, chunkSize-off)
				data := make([]byte, n)
				for i := range data {
					data[i] = byte(rng.Uint32())
				}
				err = do(snapOp{id: ids[rng.IntN(len(ids))], off: off, data: data, sn: sn, keep: keep()})
			case r < 82 && len(live) < 5:
				live = append(live, sn)
				snaps[sn] = map[uint64][]byte{}
				for id, b := range current {
					snaps[sn][id] = bytes.Clone(b)
				}
				sn++
			case r < 95 && len(live) > 0:
				drop := live[rng.IntN(len(live))]
				live = slices.DeleteFunc(slices.Clone(live), func(x uint64) bool { return x == drop })
				delete(snaps, drop)
				for _, id := range ids {
					if err = do(snapOp{id: id, trim: true, live: slices.Clone(live), bound: sn}); err != nil {
						break
					}
				}
			default:
				if err = s.Sync(nil); err == nil {
					log = nil // a checkpoint: what it covers is never replayed
				}
			}
			if err != nil {
				opErr = err
				break
			}
		}
		if powerCut(t, f, round, opErr, armed, keepPages) {
			cutsInCopy++
		}
		p, s = ts.restart(s, p)
		replay(t, s, round, log)
		check(round)
	}
	if cutsInCopy == 0 {
		t.Fatal("no crash fell inside a copy on write")
	}
	t.Logf("%d of %d crashes cut a copy on write", cutsInCopy, rounds)
	closeStore(t, s, p)
}
