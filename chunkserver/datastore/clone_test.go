package datastore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// cloneView is what a clone reads of a chunk: its own pages from the
// store, the others from src.
func cloneView(t *testing.T, s *Store, id uint64, src []byte) []byte {
	t.Helper()
	got := make([]byte, testChunk)
	absent, err := s.ReadOwned(id, got, 0)
	if errors.Is(err, ErrChunkNotExist) {
		return bytes.Clone(src)
	}
	if err != nil {
		t.Fatalf("read chunk %d: %v", id, err)
	}
	unit := s.CopyUnit()
	for k := int64(0); k*unit < testChunk; k++ {
		if absent != nil && absent[k/8]&(1<<(k%8)) != 0 {
			copy(got[k*unit:(k+1)*unit], src[k*unit:])
		}
	}
	return got
}

// TestClonePagesReadFromTheSourceUntilWritten: a clone's chunk owns only
// what was written; a partly written page takes its source's content from
// the fill, once, and a later fill never overwrites what the clone wrote;
// a write that needs a fill and has none changes nothing; the owned pages
// survive a reopen.
func TestClonePagesReadFromTheSourceUntilWritten(t *testing.T) {
	e := newEnv(t, 4, 8)
	s := e.open(t, Options{})
	unit := s.CopyUnit()
	src := pattern(3, testChunk)
	want := bytes.Clone(src)
	write := func(p []byte, off int64, fill []byte, fillOff int64) {
		t.Helper()
		if err := s.WriteClone(7, p, off, 0, 0, fill, fillOff); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
		copy(want[off:], p)
	}
	// A whole page: no fill needed.
	write(pattern(9, int(unit)), unit, nil, 0)
	// 512 bytes inside page 3, with its fill.
	write(pattern(11, 512), 3*unit+1024, src[3*unit:4*unit], 3*unit)
	if got := cloneView(t, s, 7, src); !bytes.Equal(got, want) {
		t.Fatalf("clone view differs at %d", firstDiff(got, want))
	}
	// Page 5 partly, without a fill: refused, nothing changes.
	if err := s.WriteClone(7, pattern(1, 512), 5*unit, 0, 0, nil, 0); !errors.Is(err, ErrFillMissing) {
		t.Fatalf("partial write without fill: %v", err)
	}
	// A fill alone (flatten) over pages 0..7 with wrong content where the
	// clone wrote: only pages not owned take it.
	fill := bytes.Clone(src[:8*unit])
	if err := s.WriteClone(7, nil, 0, 0, 0, fill, 0); err != nil {
		t.Fatal(err)
	}
	if got := cloneView(t, s, 7, make([]byte, testChunk)); !bytes.Equal(got[:8*unit], want[:8*unit]) {
		t.Fatalf("after a fill, the first 8 pages differ at %d", firstDiff(got, want))
	}
	absent := make([]byte, testChunk)
	bits, err := s.ReadOwned(7, absent, 0)
	if err != nil || bits[0] != 0 {
		t.Fatalf("after filling pages 0..7 some are still not owned: %08b %v", bits, err)
	}
	// The owned pages are written down at Sync, and read back on open.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	if got := cloneView(t, s, 7, src); !bytes.Equal(got, want) {
		t.Fatalf("after reopen, clone view differs at %d", firstDiff(got, want))
	}
	info, err := s.Info(7)
	if err != nil || !info.Clone || info.OwnedPages != 8 {
		t.Fatalf("info: %+v %v", info, err)
	}
	// A plain write owns what it touches too.
	if err := s.WriteAt(7, pattern(5, 512), 9*unit); err != nil {
		t.Fatal(err)
	}
	if bits, _ := s.ReadOwned(7, absent[:unit], 9*unit); bits != nil {
		t.Fatalf("page 9 not owned after a plain write: %v", bits)
	}
}

// TestCloneZeroAndDelete: unmapping a clone's chunk makes it zeros and
// owned in place (never a missing chunk, which reads its source again);
// deleting it removes its owned pages, and a clone chunk created again
// under the id owns nothing.
func TestCloneZeroAndDelete(t *testing.T) {
	e := newEnv(t, 4, 8)
	s := e.open(t, Options{})
	unit := s.CopyUnit()
	if err := s.WriteClone(3, pattern(1, int(unit)), 0, 0, 0, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(nil); err != nil {
		t.Fatal(err)
	}
	own := filepath.Join(e.dir, "chunk_3_own")
	if _, err := os.Stat(own); err != nil {
		t.Fatalf("own file after sync: %v", err)
	}
	if err := s.ZeroSN(3, 0, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, testChunk)
	if absent, err := s.ReadOwned(3, got, 0); err != nil || absent != nil || !bytes.Equal(got, make([]byte, testChunk)) {
		t.Fatalf("zeroed clone chunk: absent %v, err %v", absent, err)
	}
	if err := s.ZeroSN(9, 0, 0); err != nil { // missing: created, empty
		t.Fatal(err)
	}
	if absent, err := s.ReadOwned(9, got, 0); err != nil || absent != nil {
		t.Fatalf("zeroed missing chunk: absent %v, err %v", absent, err)
	}
	if err := s.WriteClone(4, pattern(2, int(unit)), unit, 0, 0, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(4); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "chunk_4_own")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("own file of a deleted chunk: %v", err)
	}
	if err := s.WriteClone(4, pattern(2, int(unit)), 2*unit, 0, 0, nil, 0); err != nil {
		t.Fatal(err)
	}
	absent, err := s.ReadOwned(4, got[:3*unit], 0)
	if err != nil || absent == nil || absent[0] != 0b011 {
		t.Fatalf("re-created clone chunk owns %08b (want page 2 only), err %v", absent, err)
	}
}

// TestCloneTransferResets: the receiving side of a Raft snapshot turns a
// chunk into a clone chunk with the sender's owned pages, and back.
func TestCloneTransferResets(t *testing.T) {
	e := newEnv(t, 4, 8)
	s := e.open(t, Options{})
	bits := make([]byte, s.bitmapLen())
	bits[0] = 0b101
	if err := s.WriteAt(5, pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if fresh, err := s.ResetChunk(5, 0, bits); err != nil || !fresh {
		t.Fatalf("reset a plain chunk to a clone chunk: fresh %v, %v", fresh, err)
	}
	if got, err := s.Owned(5); err != nil || !bytes.Equal(got, bits) {
		t.Fatalf("owned after reset: %v %v", got, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	if got, err := s.Owned(5); err != nil || !bytes.Equal(got, bits) {
		t.Fatalf("owned after reopen: %v %v", got, err)
	}
	if fresh, err := s.ResetChunk(5, 0, nil); err != nil || !fresh {
		t.Fatalf("reset a clone chunk to a plain one: fresh %v, %v", fresh, err)
	}
	if got, err := s.Owned(5); err != nil || got != nil {
		t.Fatalf("owned of a plain chunk: %v %v", got, err)
	}
}

// TestCloneSnapshotsReadTheSourceWhereNotOwned: a snapshot of a clone's
// chunk reads, where the chunk did not own a page when the snapshot was
// taken, from the clone's source (absent), even after the page was
// filled or written; copies on write copy only owned pages; a chunk
// created after the snapshot reads the source throughout; all of it
// survives a reopen and a merge of versions, and EachKept hands on the
// absent pages.
func TestCloneSnapshotsReadTheSourceWhereNotOwned(t *testing.T) {
	e := newEnv(t, 8, 16)
	s := e.open(t, Options{})
	unit := s.CopyUnit()
	pages := testChunk / unit
	p0 := pattern(1, int(unit))
	if err := s.WriteClone(1, p0, 0, 1, 0, nil, 0); err != nil {
		t.Fatal(err)
	}
	// Snapshot 1; writes under 2.
	if err := s.WriteClone(1, pattern(2, int(unit)), unit, 2, 1, nil, 0); err != nil { // page 1, not owned at the snapshot
		t.Fatal(err)
	}
	if err := s.WriteClone(1, pattern(3, int(unit)), 0, 2, 1, nil, 0); err != nil { // page 0, owned: copied
		t.Fatal(err)
	}
	if err := s.WriteClone(1, nil, 0, 2, 1, pattern(4, int(unit)), 2*unit); err != nil { // a fill of page 2
		t.Fatal(err)
	}
	if err := s.WriteClone(2, pattern(5, int(unit)), 0, 2, 1, nil, 0); err != nil { // a chunk created after the snapshot
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		got := make([]byte, testChunk)
		absent, err := s.ReadOwnedSN(1, got, 0, 1)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if !bytes.Equal(got[:unit], p0) {
			t.Fatalf("%s: page 0 at the snapshot differs", when)
		}
		for k := int64(0); k < pages; k++ {
			if abs := absent[k/8]&(1<<(k%8)) != 0; abs != (k > 0) {
				t.Fatalf("%s: page %d absent at the snapshot: %v", when, k, abs)
			}
		}
		if !bytes.Equal(got[unit:], make([]byte, testChunk-unit)) {
			t.Fatalf("%s: absent pages do not read as zeros", when)
		}
		absent, err = s.ReadOwnedSN(2, got, 0, 1)
		if err != nil || len(absent) != int((pages+7)/8) || absent[0] != 0xff {
			t.Fatalf("%s: chunk created after the snapshot: absent %v, %v", when, absent, err)
		}
		info, err := s.Info(1)
		if err != nil || len(info.Versions) != 1 || info.Versions[0].Pages != 1 {
			t.Fatalf("%s: versions %+v %v (want one holding page 0 only)", when, info.Versions, err)
		}
	}
	check("after the writes")
	var seen int
	if err := s.EachKept(1, func(from, to uint64, _ int64, bitmap, absent []byte) {
		seen++
		if from != 1 || to != 1 || absent == nil || absent[0]&1 != 0 || absent[0]&2 == 0 {
			t.Fatalf("EachKept: %d..%d absent %08b", from, to, absent)
		}
	}); err != nil || seen != 1 {
		t.Fatalf("EachKept: %d versions, %v", seen, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	check("after a reopen")
	// Snapshot 2, a write under 3, then snapshot 2 deleted: its version is
	// merged into snapshot 1's.
	if err := s.WriteClone(1, pattern(6, int(unit)), 3*unit, 3, 2, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteClone(1, pattern(7, int(unit)), unit, 3, 2, nil, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Trim(1, []uint64{1}, 3); err != nil {
		t.Fatal(err)
	}
	check("after a merge")
}

// TestReadOwnedSeesCloneWritesWhole: a clone's chunk owns page 0 but not
// page 1, and one write covers both. A concurrent ReadOwned sees page 0 old
// and page 1 absent, or both new: never page 0 new and page 1 absent.
func TestReadOwnedSeesCloneWritesWhole(t *testing.T) {
	e := newEnv(t, 4, 16)
	s := e.open(t, Options{CreateWait: 5 * time.Second})
	unit := s.CopyUnit()
	old, nw := bytes.Repeat([]byte{'o'}, int(unit)), bytes.Repeat([]byte{'n'}, int(2*unit))
	torn := 0
	for iter := 0; iter < 300 && torn == 0; iter++ {
		if err := s.Delete(7); err != nil {
			t.Fatal(err)
		}
		if err := s.WriteClone(7, old, 0, 0, 0, nil, 0); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- s.WriteClone(7, nw, 0, 0, 0, nil, 0) }()
		buf := make([]byte, 2*unit)
	loop:
		for {
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
				break loop
			default:
			}
			absent, err := s.ReadOwned(7, buf, 0)
			if err != nil {
				t.Fatal(err)
			}
			p1absent := absent != nil && absent[0]&2 != 0
			if buf[0] == 'n' && p1absent {
				torn++
				t.Logf("iteration %d: page 0 new, page 1 read from the source", iter)
				break
			}
		}
		if torn > 0 {
			<-done
		}
	}
	if torn > 0 {
		t.Fatalf("ReadOwned saw part of a clone write")
	}
}
