package datastore

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"slices"
	"testing"
)

// snapModel is what a volume's chunks and snapshots must read as.
type snapModel struct {
	sn      uint64                       // the volume's current sequence number
	live    []uint64                     // live snapshots, ascending
	current map[uint64][]byte            // chunk -> data (absent: never written)
	snaps   map[uint64]map[uint64][]byte // snapshot -> chunk -> data then
}

func newSnapModel() *snapModel {
	return &snapModel{sn: 1, current: map[uint64][]byte{}, snaps: map[uint64]map[uint64][]byte{}}
}

func (m *snapModel) keep() uint64 {
	if len(m.live) == 0 {
		return 0
	}
	return m.live[len(m.live)-1]
}

func (m *snapModel) write(id uint64, p []byte, off int64) {
	if m.current[id] == nil {
		m.current[id] = make([]byte, testChunk)
	}
	copy(m.current[id][off:], p)
}

func (m *snapModel) snapshot() uint64 {
	s := m.sn
	m.live = append(m.live, s)
	m.snaps[s] = map[uint64][]byte{}
	for id, b := range m.current {
		m.snaps[s][id] = bytes.Clone(b)
	}
	m.sn++
	return s
}

func (m *snapModel) drop(s uint64) {
	m.live = slices.DeleteFunc(m.live, func(x uint64) bool { return x == s })
	delete(m.snaps, s)
}

// check reads every live snapshot and the current data of chunks ids.
func (m *snapModel) check(t *testing.T, s *Store, ids []uint64, when string) {
	t.Helper()
	got := make([]byte, testChunk)
	for _, id := range ids {
		for _, snap := range m.live {
			want := m.snaps[snap][id]
			if want == nil {
				want = make([]byte, testChunk)
			}
			err := s.ReadAtSN(id, got, 0, snap)
			if errors.Is(err, ErrChunkNotExist) {
				clear(got)
				err = nil
			}
			if err != nil {
				t.Fatalf("%s: read chunk %d at snapshot %d: %v", when, id, snap, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: chunk %d at snapshot %d differs from what it held then (first difference at byte %d)", when, id, snap, firstDiff(got, want))
			}
			if ok, err := s.Exists(id, snap); err != nil || ok != (m.snaps[snap][id] != nil) {
				t.Fatalf("%s: chunk %d exists at snapshot %d: %v, %v (written before it: %v)", when, id, snap, ok, err, m.snaps[snap][id] != nil)
			}
		}
		if ok, err := s.Exists(id, 0); err != nil || ok != (m.current[id] != nil) {
			t.Fatalf("%s: chunk %d exists: %v, %v (written: %v)", when, id, ok, err, m.current[id] != nil)
		}
		want := m.current[id]
		if want == nil {
			if _, err := s.Info(id); !errors.Is(err, ErrChunkNotExist) {
				t.Fatalf("%s: chunk %d never written, Info says %v", when, id, err)
			}
			continue
		}
		if err := s.ReadAt(id, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: chunk %d current data differs (err %v, first difference at byte %d)", when, id, err, firstDiff(got, want))
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestSnapshotsReadWhatTheyTook: random writes, snapshots and snapshot
// deletions over three chunks; every live snapshot reads exactly what the
// chunks held when it was taken, across reopens, and deleting every
// snapshot leaves no version file.
func TestSnapshotsReadWhatTheyTook(t *testing.T) {
	for seed := range uint64(4) {
		e := newEnv(t, 8, 64)
		s := e.open(t, Options{})
		m := newSnapModel()
		rng := rand.New(rand.NewPCG(seed, 7))
		ids := []uint64{1, 2, 3}
		for step := range 400 {
			switch r := rng.IntN(100); {
			case r < 70:
				id := ids[rng.IntN(len(ids))]
				off := int64(rng.IntN(testChunk/testBlock)) * testBlock
				n := min(int64(1+rng.IntN(24))*testBlock, testChunk-off)
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				if err := s.WriteAtSN(id, p, off, m.sn, m.keep()); err != nil {
					t.Fatalf("seed %d step %d: write: %v", seed, step, err)
				}
				m.write(id, p, off)
			case r < 82:
				m.snapshot()
			case r < 92 && len(m.live) > 0:
				m.drop(m.live[rng.IntN(len(m.live))])
				for _, id := range ids {
					if err := s.Trim(id, m.live, m.sn); err != nil {
						t.Fatalf("seed %d step %d: trim: %v", seed, step, err)
					}
				}
			case r < 95:
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
				s = e.open(t, Options{})
			default:
				m.check(t, s, ids, "mid-run")
			}
		}
		m.check(t, s, ids, "at the end")
		for len(m.live) > 0 {
			m.drop(m.live[0])
		}
		for _, id := range ids {
			if err := s.Trim(id, nil, m.sn); err != nil {
				t.Fatal(err)
			}
			if info, err := s.Info(id); err == nil && len(info.Versions) != 0 {
				t.Fatalf("seed %d: chunk %d keeps versions %+v with no snapshot left", seed, id, info.Versions)
			}
		}
		m.check(t, s, ids, "after dropping every snapshot")
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestWritesAfterASnapshotCopyOnlyOnce: the first write of a page after a
// snapshot copies it; later writes of it do not, and a chunk created after
// the snapshot reads as zeros in it.
func TestWritesAfterASnapshotCopyOnlyOnce(t *testing.T) {
	e := newEnv(t, 4, 8)
	s := e.open(t, Options{})
	a, b, c := pattern(1, testChunk), pattern(2, 4096), pattern(3, 4096)
	if err := s.WriteAtSN(1, a, 0, 1, 0); err != nil {
		t.Fatal(err)
	}
	// Snapshot 1; the volume moves to 2.
	if err := s.WriteAtSN(1, b, 8192, 2, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAtSN(1, c, 8192, 2, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAtSN(2, c, 0, 2, 1); err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(1)
	if err != nil {
		t.Fatal(err)
	}
	if info.SN != 2 || info.CreatedSN != 1 || len(info.Versions) != 1 || info.Versions[0].From != 1 || info.Versions[0].To != 1 || info.Versions[0].Pages != 1 {
		t.Fatalf("chunk 1 after two writes of one page under a snapshot: %+v", info)
	}
	got := make([]byte, testChunk)
	if err := s.ReadAtSN(1, got, 0, 1); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("snapshot 1 of chunk 1: %v (equal %v)", err, bytes.Equal(got, a))
	}
	if err := s.ReadAtSN(2, got[:4096], 0, 1); err != nil || !bytes.Equal(got[:4096], make([]byte, 4096)) {
		t.Fatalf("snapshot 1 of chunk 2, created later: %v, want zeros", err)
	}
	if err := s.ReadAtSN(1, got, 0, 0); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("read at sequence number 0: %v", err)
	}
	// Without a live snapshot a newer sequence number keeps nothing.
	if err := s.WriteAtSN(3, c, 0, 2, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAtSN(3, b, 0, 3, 0); err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(3); err != nil || len(info.Versions) != 0 || info.SN != 3 {
		t.Fatalf("chunk 3 written under two sequence numbers with no snapshot: %+v %v", info, err)
	}
}

// TestVersionMetaSlots: a version meta page with one damaged slot reads
// the other; with both damaged it is corrupt.
func TestVersionMetaSlots(t *testing.T) {
	m := versionMeta{ChunkID: 9, From: 3, To: 5, ChunkSize: 1 << 20, Unit: 4096, Generation: 7, Bitmap: []byte{0xff, 1}}
	page := make([]byte, 4096)
	copy(page, encodeVersionSlot(&m, 2048))
	m2 := m.clone()
	m2.Generation, m2.To = 8, 6
	copy(page[2048:], encodeVersionSlot(&m2, 2048))
	got, err := decodeVersionPage(page, 2)
	if err != nil || got.Generation != 8 || got.To != 6 {
		t.Fatalf("decode: %+v %v", got, err)
	}
	page[2100] ^= 1 // the newer slot torn
	if got, err = decodeVersionPage(page, 2); err != nil || got.Generation != 7 || got.To != 5 {
		t.Fatalf("decode with the newer slot damaged: %+v %v", got, err)
	}
	page[10] ^= 1
	if _, err := decodeVersionPage(page, 2); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("both slots damaged: %v", err)
	}
	if id, from, ok := parseVersionName(versionName(12, 34)); !ok || id != 12 || from != 34 {
		t.Fatalf("version name round trip: %d %d %v", id, from, ok)
	}
	for _, bad := range []string{"chunk_1_snap_", "chunk_1_snap_01", "chunk_x_snap_1", "chunk_1_snap_1.creating"} {
		if _, _, ok := parseVersionName(bad); ok {
			t.Fatalf("%q parsed as a version name", bad)
		}
	}
}

// TestVersionHousekeeping: versions do not outlive what reads them, and
// no file leaks from the pool: a deleted and re-created chunk starts
// without versions, a snapshot older than the chunk keeps none, a merge
// interrupted before its source was recycled is finished at open, a
// destroyed store gives every file back, and a damaged version fails the
// reads that may need it instead of reading the current data.
func TestVersionHousekeeping(t *testing.T) {
	e := newEnv(t, 8, 16)
	s := e.open(t, Options{})
	a, b := pattern(1, testChunk), pattern(2, testChunk)
	versions := func(id uint64) []VersionInfo {
		t.Helper()
		info, err := s.Info(id)
		if err != nil {
			t.Fatal(err)
		}
		return info.Versions
	}

	// Delete and create again.
	if err := s.WriteAtSN(1, a, 0, 1, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAtSN(1, b[:4096], 0, 2, 1); err != nil {
		t.Fatal(err)
	}
	if n := len(versions(1)); n != 1 {
		t.Fatalf("%d versions after a write under a snapshot", n)
	}
	if err := s.Delete(1); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAtSN(1, b[:4096], 0, 2, 1); err != nil {
		t.Fatal(err)
	}
	if v := versions(1); len(v) != 0 {
		t.Fatalf("re-created chunk has versions %+v", v)
	}

	// A snapshot taken before the chunk existed keeps nothing of it.
	if err := s.WriteAtSN(2, a, 0, 2, 1); err != nil { // created under 2; snapshot 1 is older
		t.Fatal(err)
	}
	if err := s.WriteAtSN(2, b[:4096], 0, 3, 2); err != nil { // snapshot 2 keeps [2,2]
		t.Fatal(err)
	}
	if err := s.Trim(2, []uint64{1}, 3); err != nil { // snapshot 2 deleted
		t.Fatal(err)
	}
	if v := versions(2); len(v) != 0 {
		t.Fatalf("versions %+v kept for a snapshot older than the chunk", v)
	}

	// A merge that made its target durable, then crashed before recycling
	// its source.
	if err := s.WriteAtSN(3, a, 0, 1, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAtSN(3, b[:4096], 0, 2, 1); err != nil { // [1,1] holds page 0
		t.Fatal(err)
	}
	if err := s.WriteAtSN(3, b[4096:8192], 4096, 3, 2); err != nil { // [2,2] holds page 1
		t.Fatal(err)
	}
	c, _ := s.lookup(3)
	if err := s.merge(c.versions[0], c.versions[1]); err != nil { // and no recycle
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	if v := versions(3); len(v) != 1 || v[0].From != 1 || v[0].To != 2 || v[0].Pages != 2 {
		t.Fatalf("after an interrupted merge and a reopen: versions %+v", v)
	}
	got := make([]byte, testChunk)
	for _, snap := range []uint64{1, 2} {
		if err := s.ReadAtSN(3, got, 0, snap); err != nil || !bytes.Equal(got, a) {
			t.Fatalf("snapshot %d after the merge: %v (equal %v)", snap, err, bytes.Equal(got, a))
		}
	}

	// A damaged version fails the reads that may need it.
	c, _ = s.lookup(3)
	path := c.versions[0].path
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, testMeta), 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	s = e.open(t, Options{})
	if err := s.ReadAtSN(3, got, 0, 1); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("read through a damaged version: %v, want ErrCorrupt", err)
	}
	if err := s.Trim(3, nil, 5); err != nil {
		t.Fatal(err)
	}
	if v := versions(3); len(v) != 1 {
		t.Fatalf("trim dropped a damaged version: %+v", v)
	}

	// Destroy gives every file back, versions included.
	if err := s.Destroy(); err != nil {
		t.Fatal(err)
	}
	if st := e.pool.Stats(); st.InUse != 0 {
		t.Fatalf("after Destroy the pool counts %d files in use", st.InUse)
	}
}

// TestChunkWrittenOutsideSnapshotsJoinsThem: a chunk written before its
// volume had snapshots (sequence number 0) keeps its state for the first
// snapshot like any other.
func TestChunkWrittenOutsideSnapshotsJoinsThem(t *testing.T) {
	e := newEnv(t, 4, 8)
	s := e.open(t, Options{})
	a, b := pattern(1, testChunk), pattern(2, 4096)
	if err := s.WriteAt(1, a, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	if err := s.WriteAtSN(1, b, 0, 2, 1); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, testChunk)
	if err := s.ReadAtSN(1, got, 0, 1); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("first snapshot of a chunk written outside snapshots: %v (equal %v)", err, bytes.Equal(got, a))
	}
}
