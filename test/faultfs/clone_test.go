package faultfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"cairn.io/cairn/chunkserver/datastore"
)

// cloneOp is one state-machine operation on a clone's chunk, as a
// copyset's log would carry it: a write with its fill, a fill alone
// (flatten), an unmap (ZeroSN) or a delete.
type cloneOp struct {
	id      uint64
	off     int64
	data    []byte
	fill    []byte
	fillOff int64
	zero    bool
	delete  bool
}

func (o cloneOp) apply(s *datastore.Store) error {
	if o.zero {
		return s.ZeroSN(o.id, 0, 0)
	}
	if o.delete {
		return s.Delete(o.id)
	}
	return s.WriteClone(o.id, o.data, o.off, 0, 0, o.fill, o.fillOff)
}

// TestClonePagesSurviveCrashes writes clone chunks (partial pages with the
// source's fill, fills alone, unmaps, deletes), cuts the power, often at the
// fdatasync of an owned-pages file, with partial writeback, then reopens
// and replays the operations since the last checkpoint as a copyset does.
// What the clone reads (its own pages, the source's elsewhere) is then
// exactly what it wrote on top of the source. Writing the owned pages down
// before their data is durable, or replaying without the fills, fails it.
func TestClonePagesSurviveCrashes(t *testing.T) {
	f := MountForTest(t, Options{})
	const chunkSize = 64 << 10
	const unit = 4096
	ts := testStore{t: t, f: f, initial: 16, most: 32}
	p, s := ts.open()

	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 9))
	ids := []uint64{1, 2, 3}
	src := map[uint64][]byte{}
	want := map[uint64][]byte{}
	for _, id := range ids {
		src[id] = make([]byte, chunkSize)
		for i := range src[id] {
			src[id][i] = byte(rng.Uint32() | 1) // never zero: a lost fill shows
		}
		want[id] = bytes.Clone(src[id])
	}
	var log []cloneOp // since the last checkpoint
	do := func(o cloneOp) error {
		log = append(log, o)
		switch {
		case o.zero:
			clear(want[o.id])
		case o.delete:
			copy(want[o.id], src[o.id])
		default:
			copy(want[o.id][o.off:], o.data)
		}
		return o.apply(s)
	}
	check := func(round int) {
		t.Helper()
		for _, id := range ids {
			got := make([]byte, chunkSize)
			absent, err := s.ReadOwned(id, got, 0)
			if errors.Is(err, datastore.ErrChunkNotExist) {
				copy(got, src[id])
				err = nil
			}
			if err != nil {
				t.Fatalf("round %d: read chunk %d: %v", round, id, err)
			}
			for k := 0; k*unit < chunkSize; k++ {
				if absent != nil && absent[k/8]&(1<<(k%8)) != 0 {
					copy(got[k*unit:(k+1)*unit], src[id][k*unit:])
				}
			}
			if !bytes.Equal(got, want[id]) {
				for k := 0; k*unit < chunkSize; k++ {
					if !bytes.Equal(got[k*unit:(k+1)*unit], want[id][k*unit:(k+1)*unit]) {
						t.Logf("page %d differs (absent %v)", k, absent != nil && absent[k/8]&(1<<(k%8)) != 0)
					}
				}
				t.Fatalf("round %d: chunk %d does not read what the clone wrote (%d operations replayed)", round, id, len(log))
			}
		}
	}

	cutsAtOwned := 0
	const rounds = 100
	for round := range rounds {
		keepPages := rng.Float64()
		var armed RuleID
		if rng.IntN(3) > 0 {
			var err error
			if armed, err = f.CrashAtSync(`^store/chunk_[0-9]+_own$`, 1+rng.IntN(3), CrashOptions{Keep: keepPages, Seed: uint64(round)}); err != nil {
				t.Fatal(err)
			}
		}
		var opErr error
		for range 30 {
			var err error
			id := ids[rng.IntN(len(ids))]
			switch r := rng.IntN(100); {
			case r < 60:
				off := int64(rng.IntN(chunkSize/512)) * 512
				n := min(int64(1+rng.IntN(20))*512, chunkSize-off)
				data := make([]byte, n)
				for i := range data {
					data[i] = byte(rng.Uint32())
				}
				lo, hi := off/unit*unit, min((off+n+unit-1)/unit*unit, chunkSize)
				err = do(cloneOp{id: id, off: off, data: data, fill: bytes.Clone(src[id][lo:hi]), fillOff: lo})
			case r < 72:
				lo := int64(rng.IntN(chunkSize/unit)) * unit
				hi := min(lo+int64(1+rng.IntN(6))*unit, chunkSize)
				err = do(cloneOp{id: id, fill: bytes.Clone(src[id][lo:hi]), fillOff: lo})
			case r < 73:
				err = do(cloneOp{id: id, zero: true})
			case r < 76:
				err = do(cloneOp{id: id, delete: true})
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
			cutsAtOwned++
		}
		p, s = ts.restart(s, p)
		replay(t, s, round, log)
		check(round)
	}
	if cutsAtOwned == 0 {
		t.Fatal("no crash fell at an owned-pages fdatasync")
	}
	t.Logf("%d of %d crashes cut a sync of owned pages", cutsAtOwned, rounds)
	closeStore(t, s, p)
}

// TestClonePagesSurviveFailedSync: a chunk file's fdatasync fails (the
// filesystem drops its unsynced pages, as Linux may); the copyset then
// applies again what it applied since the last checkpoint, on the same
// store. The pages filled since must be filled again: a store that kept
// them owned would skip the fills and read zeros where the clone reads its
// source.
func TestClonePagesSurviveFailedSync(t *testing.T) {
	f := MountForTest(t, Options{})
	const chunkSize = 64 << 10
	const unit = 4096
	p, s := testStore{t: t, f: f, initial: 4, most: 8}.open()
	defer p.Close()
	defer s.Close()
	src := make([]byte, chunkSize)
	for i := range src {
		src[i] = byte(i%251 + 1)
	}
	want := bytes.Clone(src)
	var log []cloneOp
	do := func(o cloneOp) {
		t.Helper()
		log = append(log, o)
		copy(want[o.off:], o.data)
		if err := o.apply(s); err != nil {
			t.Fatal(err)
		}
	}
	// A checkpoint with the chunk created and one page owned.
	do(cloneOp{id: 1, off: 0, data: bytes.Repeat([]byte{7}, unit)})
	if err := s.Sync(nil); err != nil {
		t.Fatal(err)
	}
	log = nil
	// Partial pages with their fills, after the checkpoint.
	for k := int64(2); k < 10; k++ {
		off := k*unit + 1024
		do(cloneOp{id: 1, off: off, data: bytes.Repeat([]byte{byte(k)}, 512), fill: bytes.Clone(src[k*unit : (k+1)*unit]), fillOff: k * unit})
	}
	rule, err := f.FailSync(`^store/chunk_1$`, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(nil); err == nil {
		t.Fatal("sync did not fail")
	}
	f.RemoveRule(rule)
	for _, o := range log { // the copyset's rewrite since the checkpoint
		if err := o.apply(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sync(nil); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, chunkSize)
	absent, err := s.ReadOwned(1, got, 0)
	if err != nil {
		t.Fatal(err)
	}
	for k := 0; k*unit < chunkSize; k++ {
		if absent != nil && absent[k/8]&(1<<(k%8)) != 0 {
			copy(got[k*unit:(k+1)*unit], src[k*unit:])
		}
	}
	for k := 0; k*unit < chunkSize; k++ {
		if !bytes.Equal(got[k*unit:(k+1)*unit], want[k*unit:(k+1)*unit]) {
			t.Fatalf("page %d does not read what the clone wrote after the failed sync and the rewrite", k)
		}
	}
}
