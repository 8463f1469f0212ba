package datastore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/internal/soon"
)

const (
	testChunk = 64 << 10
	testMeta  = 4 << 10
	testBlock = 512
)

func newPool(t *testing.T, dir string, initial, maxFiles int) *chunkfilepool.Pool {
	t.Helper()
	p, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir:           dir,
		ChunkSize:     testChunk,
		MetaPageSize:  testMeta,
		BlockSize:     testBlock,
		InitialChunks: initial,
		MaxChunks:     maxFiles,
		LowWater:      1,
		GrowBy:        2,
		GetTimeout:    time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	// A chunk create waits only Options.CreateWait (50ms) for the formatter;
	// start each test with the initial files formatted so that a slow machine
	// does not turn that short wait into a spurious ErrNoSpace.
	soon.Succeeds(t, time.Minute, func() error {
		if st := p.Stats(); st.FormatPercent < 100 {
			return fmt.Errorf("pool formatting %d%%", st.FormatPercent)
		}
		return nil
	})
	return p
}

type env struct {
	root string
	pool *chunkfilepool.Pool
	dir  string
}

func newEnv(t *testing.T, initial, maxFiles int) *env {
	root := t.TempDir()
	return &env{root: root, pool: newPool(t, filepath.Join(root, "pool"), initial, maxFiles), dir: filepath.Join(root, "copysets", "1-1")}
}

func (e *env) open(t *testing.T, o Options) *Store {
	t.Helper()
	s, err := Open(e.dir, e.pool, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func readChunk(t *testing.T, s *Store, id uint64) []byte {
	t.Helper()
	b := make([]byte, testChunk)
	if err := s.ReadAt(id, b, 0); err != nil {
		t.Fatalf("read chunk %d: %v", id, err)
	}
	return b
}

func TestWriteReadMatchesModelAcrossReopen(t *testing.T) {
	e := newEnv(t, 4, 8)
	s := e.open(t, Options{})
	model := map[uint64][]byte{}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		id := uint64(rng.IntN(4) + 1)
		blocks := testChunk / testBlock
		off := rng.IntN(blocks)
		n := 1 + rng.IntN(min(16, blocks-off))
		data := pattern(byte(i), n*testBlock)
		if err := s.WriteAt(id, data, int64(off*testBlock)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		if model[id] == nil {
			model[id] = make([]byte, testChunk)
		}
		copy(model[id][off*testBlock:], data)
		// Read back a random range and compare.
		roff := rng.IntN(blocks)
		rn := 1 + rng.IntN(blocks-roff)
		got := make([]byte, rn*testBlock)
		if err := s.ReadAt(id, got, int64(roff*testBlock)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model[id][roff*testBlock:(roff+rn)*testBlock]) {
			t.Fatalf("op %d: chunk %d range %d+%d differs from what was written", i, id, roff, rn)
		}
	}
	check := func(s *Store) {
		t.Helper()
		var want []uint64
		for id := uint64(1); id <= 4; id++ {
			if model[id] != nil {
				want = append(want, id)
				if !bytes.Equal(readChunk(t, s, id), model[id]) {
					t.Fatalf("chunk %d differs", id)
				}
			}
		}
		if got := s.List(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("list %v, want %v", got, want)
		}
	}
	check(s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.ReadAt(1, make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	s = e.open(t, Options{})
	check(s)
	info, err := s.Info(1)
	if err != nil || info.ID != 1 || info.Size != testChunk || info.Version != MetaVersion {
		t.Fatalf("info %+v %v", info, err)
	}
}

func TestNeverWrittenRangesReadAsZeros(t *testing.T) {
	e := newEnv(t, 2, 2)
	s := e.open(t, Options{})
	data := pattern(9, 1024)
	if err := s.WriteAt(5, data, 8192); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, testChunk)
	copy(want[8192:], data)
	if !bytes.Equal(readChunk(t, s, 5), want) {
		t.Fatal("chunk content differs from one 1 KiB write into zeros")
	}
}

func TestInvalidRangesChangeNothing(t *testing.T) {
	e := newEnv(t, 2, 2)
	s := e.open(t, Options{})
	for _, c := range []struct {
		n   int
		off int64
	}{
		{512, 100},                 // misaligned offset
		{100, 0},                   // misaligned length
		{0, 0},                     // empty
		{1024, testChunk - 512},    // runs past the end
		{512, testChunk},           // starts at the end
		{512, -512},                // negative
		{testChunk + 512, 0},       // longer than a chunk
		{512, 1<<62 + testChunk/2}, // overflow
	} {
		err := s.WriteAt(1, make([]byte, c.n), c.off)
		if !errors.Is(err, ErrInvalidRange) {
			t.Fatalf("write %d at %d: %v, want ErrInvalidRange", c.n, c.off, err)
		}
		if err := s.ReadAt(1, make([]byte, c.n), c.off); !errors.Is(err, ErrInvalidRange) {
			t.Fatalf("read %d at %d: %v, want ErrInvalidRange", c.n, c.off, err)
		}
	}
	if ids := s.List(); len(ids) != 0 {
		t.Fatalf("invalid writes created chunks %v", ids)
	}
	if st := e.pool.Stats(); st.InUse != 0 {
		t.Fatalf("invalid writes took pool files: %+v", st)
	}
	if err := s.ReadAt(1, make([]byte, 512), 0); !errors.Is(err, ErrChunkNotExist) {
		t.Fatalf("read missing chunk: %v", err)
	}
	if _, err := s.Info(1); !errors.Is(err, ErrChunkNotExist) {
		t.Fatalf("info of missing chunk: %v", err)
	}
	if _, err := s.Hash(1, 0, 0); !errors.Is(err, ErrChunkNotExist) {
		t.Fatalf("hash of missing chunk: %v", err)
	}
}

func TestDeleteRecyclesAndReuseReadsZeros(t *testing.T) {
	e := newEnv(t, 1, 1) // one file: the next chunk must reuse it
	s := e.open(t, Options{})
	full := bytes.Repeat([]byte{0xAA}, testChunk)
	if err := s.WriteAt(1, full, 0); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.Exists(1, 0); !ok || err != nil {
		t.Fatalf("written chunk exists: %v, %v", ok, err)
	}
	if err := s.Delete(1); err != nil {
		t.Fatal(err)
	}
	if err := s.ReadAt(1, make([]byte, 512), 0); !errors.Is(err, ErrChunkNotExist) {
		t.Fatalf("read deleted chunk: %v", err)
	}
	if ok, err := s.Exists(1, 0); ok || err != nil {
		t.Fatalf("deleted chunk exists: %v, %v", ok, err)
	}
	if err := s.Delete(1); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if ids := s.List(); len(ids) != 0 {
		t.Fatalf("list after delete: %v", ids)
	}
	// Chunk 2 gets the same file once the pool has zeroed it.
	if err := s.WriteAt(2, pattern(3, 512), 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, testChunk)
	copy(want, pattern(3, 512))
	if !bytes.Equal(readChunk(t, s, 2), want) {
		t.Fatal("new chunk on a recycled file shows old data")
	}
	if st := e.pool.Stats(); st.InUse != 1 || st.Owned != 1 {
		t.Fatalf("pool %+v", st)
	}
}

func TestNoSpaceCreatesNothing(t *testing.T) {
	e := newEnv(t, 2, 2)
	s := e.open(t, Options{})
	for id := uint64(1); id <= 2; id++ {
		if err := s.WriteAt(id, pattern(1, 512), 0); err != nil {
			t.Fatal(err)
		}
	}
	err := s.WriteAt(3, pattern(1, 512), 0)
	if !errors.Is(err, ErrNoSpace) || !errors.Is(err, chunkfilepool.ErrPoolEmpty) {
		t.Fatalf("write with empty pool: %v, want ErrNoSpace wrapping ErrPoolEmpty", err)
	}
	if ids := s.List(); fmt.Sprint(ids) != "[1 2]" {
		t.Fatalf("list %v", ids)
	}
	ents, _ := os.ReadDir(e.dir)
	if len(ents) != 2 {
		t.Fatalf("store dir holds %d entries, want the 2 chunks", len(ents))
	}
	// Existing chunks still take writes.
	if err := s.WriteAt(2, pattern(2, 512), 512); err != nil {
		t.Fatal(err)
	}
}

func corruptByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptMetaPageIsReportedNotTrusted(t *testing.T) {
	e := newEnv(t, 4, 4)
	s := e.open(t, Options{})
	for id := uint64(1); id <= 3; id++ {
		if err := s.WriteAt(id, pattern(byte(id), 512), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// 1: a flipped bit in the page; 2: a file renamed to another chunk's
	// name (meta page names chunk 2, file says 7); 3: a truncated file.
	corruptByte(t, filepath.Join(e.dir, "chunk_1"), 20)
	if err := os.Rename(filepath.Join(e.dir, "chunk_2"), filepath.Join(e.dir, "chunk_7")); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(e.dir, "chunk_3"), testMeta+100); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	if ids := s.List(); fmt.Sprint(ids) != "[1 3 7]" {
		t.Fatalf("list %v", ids)
	}
	for _, id := range []uint64{1, 3, 7} {
		if err := s.ReadAt(id, make([]byte, 512), 0); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("read corrupt chunk %d: %v", id, err)
		}
		if err := s.WriteAt(id, make([]byte, 512), 0); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("write corrupt chunk %d: %v", id, err)
		}
		if _, err := s.Info(id); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("info corrupt chunk %d: %v", id, err)
		}
		if _, err := s.Hash(id, 0, 0); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("hash corrupt chunk %d: %v", id, err)
		}
		// Mapped as data: a copy reads it and learns of the failure.
		if ok, err := s.Exists(id, 0); !ok || err != nil {
			t.Fatalf("corrupt chunk %d exists: %v, %v", id, ok, err)
		}
	}
	if _, err := s.Info(1); err == nil || !strings.Contains(err.Error(), "CRC32C") {
		t.Fatalf("error does not say what is wrong: %v", err)
	}
	if err := s.Delete(1); err != nil {
		t.Fatal(err)
	}
	if ids := s.List(); fmt.Sprint(ids) != "[3 7]" {
		t.Fatalf("list after delete %v", ids)
	}
}

func TestInterruptedCreationGoesBackToPool(t *testing.T) {
	e := newEnv(t, 2, 2)
	failRename := errors.New("test: crash before rename")
	s := e.open(t, Options{TestingKnobs: TestingKnobs{BeforeCreateRename: func(uint64) error { return failRename }}})
	if err := s.WriteAt(1, pattern(1, 512), 0); !errors.Is(err, failRename) {
		t.Fatalf("write: %v", err)
	}
	if ents, _ := os.ReadDir(e.dir); len(ents) != 0 {
		t.Fatalf("failed creation left %v", ents)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		if st := e.pool.Stats(); st.InUse != 0 || st.Clean != 2 {
			return fmt.Errorf("pool %+v", st)
		}
		return nil
	})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// A crash between the pool's rename and the final rename leaves a
	// temporary file with data the pool gave (zeros) and a meta page; Open
	// gives it back.
	if err := e.pool.Get(filepath.Join(e.dir, "chunk_9"+creatingSuffix)); err != nil {
		t.Fatal(err)
	}
	s = e.open(t, Options{})
	if ids := s.List(); len(ids) != 0 {
		t.Fatalf("list %v", ids)
	}
	if ents, _ := os.ReadDir(e.dir); len(ents) != 0 {
		t.Fatalf("store dir keeps %v", ents)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		if st := e.pool.Stats(); st.InUse != 0 || st.Clean != 2 {
			return fmt.Errorf("pool %+v", st)
		}
		return nil
	})
}

// TestSyncCoversCompletedWrites checks Sync's promise under concurrent
// writes: every write that returned before Sync was called is followed by
// an fdatasync of its chunk that began after the write's data reached the
// file. Each writer stamps its i-th write with i; just before each
// fdatasync the test reads the chunk file to learn the newest write whose
// data is in the file, which that fdatasync therefore covers.
func TestSyncCoversCompletedWrites(t *testing.T) {
	const chunks = 6
	const blocks = testChunk / testBlock
	e := newEnv(t, chunks, chunks)
	var completed, covered [chunks + 1]atomic.Int64
	s := e.open(t, Options{TestingKnobs: TestingKnobs{BeforeFdatasync: func(id uint64) {
		data, err := os.ReadFile(filepath.Join(e.dir, chunkName(id)))
		if err != nil {
			t.Error(err)
			return
		}
		var newest int64
		for b := range blocks {
			newest = max(newest, int64(binary.LittleEndian.Uint64(data[testMeta+b*testBlock:])))
		}
		for {
			c := covered[id].Load()
			if newest <= c || covered[id].CompareAndSwap(c, newest) {
				return
			}
		}
	}}})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for id := uint64(1); id <= chunks; id++ {
		wg.Go(func() {
			buf := pattern(byte(id), testBlock)
			for i := int64(1); ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				binary.LittleEndian.PutUint64(buf, uint64(i))
				if err := s.WriteAt(id, buf, (i%blocks)*testBlock); err != nil {
					t.Error(err)
					return
				}
				completed[id].Store(i)
				if i%50 == 0 {
					time.Sleep(time.Millisecond) // let the syncer in on a busy machine
				}
			}
		})
	}
	stopWriters := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopWriters()
	var last [chunks + 1]int64
	for range 30 {
		// Let every writer make progress between two Syncs.
		soon.Succeeds(t, 30*time.Second, func() error {
			for id := 1; id <= chunks; id++ {
				if completed[id].Load() <= last[id] {
					return fmt.Errorf("chunk %d made no progress", id)
				}
			}
			return nil
		})
		var before [chunks + 1]int64
		for id := 1; id <= chunks; id++ {
			before[id] = completed[id].Load()
		}
		if err := s.Sync(nil); err != nil {
			t.Fatal(err)
		}
		for id := 1; id <= chunks; id++ {
			if c := covered[id].Load(); c < before[id] {
				t.Fatalf("chunk %d: %d writes completed before Sync, fdatasync covered only %d", id, before[id], c)
			}
		}
		last = before
	}
	stopWriters()
	if err := s.Sync(nil); err != nil {
		t.Fatal(err)
	}
	for id := 1; id <= chunks; id++ {
		if completed[id].Load() == 0 || covered[id].Load() != completed[id].Load() {
			t.Fatalf("chunk %d: %d writes, %d covered after the final Sync", id, completed[id].Load(), covered[id].Load())
		}
	}
	// Nothing written since: Sync has nothing to do.
	calls := 0
	s.knobs.BeforeFdatasync = func(uint64) { calls++ }
	if err := s.Sync(nil); err != nil || calls != 0 {
		t.Fatalf("idle sync: %d fdatasyncs, %v", calls, err)
	}
}

// openFilesUnder counts this process's descriptors open on chunk files
// under dir.
func openFilesUnder(t *testing.T, dir string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && strings.HasPrefix(target, dir+"/") && strings.HasPrefix(filepath.Base(target), chunkPrefix) {
			n++
		}
	}
	return n
}

func TestFileDescriptorsStayBounded(t *testing.T) {
	e := newEnv(t, 20, 20)
	files := NewFileCache(4)
	s1 := e.open(t, Options{Files: files})
	s2, err := Open(filepath.Join(e.root, "copysets", "1-2"), e.pool, Options{Files: files})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	for id := uint64(1); id <= 10; id++ {
		for _, s := range []*Store{s1, s2} {
			if err := s.WriteAt(id, pattern(byte(id), 1024), 2048); err != nil {
				t.Fatal(err)
			}
		}
	}
	for id := uint64(1); id <= 10; id++ {
		for _, s := range []*Store{s1, s2} {
			got := make([]byte, 1024)
			if err := s.ReadAt(id, got, 2048); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, pattern(byte(id), 1024)) {
				t.Fatalf("chunk %d differs after eviction", id)
			}
		}
	}
	if err := s1.Sync(nil); err != nil {
		t.Fatal(err)
	}
	if n := openFilesUnder(t, filepath.Join(e.root, "copysets")); n > 4 {
		t.Fatalf("%d chunk files open, cache bound is 4", n)
	}
	st := files.Stats()
	if st.Open > 4 || st.Evictions == 0 || st.Hits == 0 {
		t.Fatalf("cache stats %+v", st)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if n := openFilesUnder(t, filepath.Join(e.root, "copysets")); n != 0 {
		t.Fatalf("%d chunk files open after Close", n)
	}
}

func TestHotPathDoesNotAllocate(t *testing.T) {
	e := newEnv(t, 1, 1)
	s := e.open(t, Options{})
	buf := pattern(1, 4096)
	if err := s.WriteAt(1, buf, 0); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(200, func() {
		if err := s.WriteAt(1, buf, 8192); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("WriteAt allocates %.1f times per call", n)
	}
	if n := testing.AllocsPerRun(200, func() {
		if err := s.ReadAt(1, buf, 8192); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("ReadAt allocates %.1f times per call", n)
	}
}

func TestHash(t *testing.T) {
	e := newEnv(t, 1, 1)
	s := e.open(t, Options{})
	data := pattern(5, 4096)
	if err := s.WriteAt(1, data, 4096); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, testChunk)
	copy(want[4096:], data)
	tab := crc32.MakeTable(crc32.Castagnoli)
	if h, err := s.Hash(1, 0, 0); err != nil || h != crc32.Checksum(want, tab) {
		t.Fatalf("whole-chunk hash %08x %v", h, err)
	}
	if h, err := s.Hash(1, 4096, 4096); err != nil || h != crc32.Checksum(data, tab) {
		t.Fatalf("range hash %08x %v", h, err)
	}
	if _, err := s.Hash(1, 100, 512); !errors.Is(err, ErrInvalidRange) {
		t.Fatalf("misaligned hash: %v", err)
	}
	if _, err := s.Hash(1, 0, testChunk+512); !errors.Is(err, ErrInvalidRange) {
		t.Fatalf("oversized hash: %v", err)
	}
}

func TestConcurrentCreationOfManyChunks(t *testing.T) {
	e := newEnv(t, 4, 16) // fewer clean files than writers: some wait for formatting
	s := e.open(t, Options{FDCacheSize: 8, CreateWait: time.Minute})
	var wg sync.WaitGroup
	for id := uint64(1); id <= 16; id++ {
		wg.Go(func() {
			for off := int64(0); off < testChunk; off += testChunk / 4 {
				if err := s.WriteAt(id, pattern(byte(id), 2048), off); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if len(s.List()) != 16 {
		t.Fatalf("list %v", s.List())
	}
	for id := uint64(1); id <= 16; id++ {
		got := make([]byte, 2048)
		if err := s.ReadAt(id, got, 3*testChunk/4); err != nil || !bytes.Equal(got, pattern(byte(id), 2048)) {
			t.Fatalf("chunk %d: %v", id, err)
		}
	}
}

func TestDestroyReturnsEverythingToPool(t *testing.T) {
	e := newEnv(t, 4, 4)
	s := e.open(t, Options{})
	for id := uint64(1); id <= 3; id++ {
		if err := s.WriteAt(id, pattern(1, 512), 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Destroy(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("store dir after destroy: %v", err)
	}
	if err := s.WriteAt(1, pattern(1, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after destroy: %v", err)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		if st := e.pool.Stats(); st.InUse != 0 || st.Clean != 4 {
			return fmt.Errorf("pool %+v", st)
		}
		return nil
	})
}

func TestOpenIsExclusive(t *testing.T) {
	e := newEnv(t, 1, 1)
	s := e.open(t, Options{})
	if _, err := Open(e.dir, e.pool, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	e.open(t, Options{})
}

// TestDeleteAfterTheFileMovedDoesNotBringTheChunkBack: when handing a
// chunk's file to the pool fails after the file moved (a directory fsync),
// the chunk is gone from the store: put back, it would name a file that no
// longer exists, and every later read, write or snapshot of it would fail.
func TestDeleteAfterTheFileMovedDoesNotBringTheChunkBack(t *testing.T) {
	e := newEnv(t, 2, 2)
	failSync := errors.New("test: directory fsync failed")
	s := e.open(t, Options{TestingKnobs: TestingKnobs{AfterRecycle: func(uint64) error { return failSync }}})
	if err := s.WriteAt(1, pattern(1, 512), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(1); !errors.Is(err, failSync) {
		t.Fatalf("delete: %v, want the fsync failure", err)
	}
	if ids := s.List(); len(ids) != 0 {
		t.Fatalf("chunks after the delete: %v", ids)
	}
	if err := s.ReadAt(1, make([]byte, 512), 0); !errors.Is(err, ErrChunkNotExist) {
		t.Fatalf("read of the deleted chunk: %v", err)
	}
	// The apply retries the delete: done.
	if err := s.Delete(1); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if err := s.WriteAt(1, pattern(2, 512), 0); err != nil {
		t.Fatalf("a new chunk 1: %v", err)
	}
}

// TestReadsSeeWritesWhole: a read that runs while a write of the same range
// is copied into the page cache sees the whole write or none of it, never a
// mix (the copyset's leader reads while it applies writes).
func TestReadsSeeWritesWhole(t *testing.T) {
	e := newEnv(t, 2, 4)
	s := e.open(t, Options{})
	const n = 64 << 10
	a, b := bytes.Repeat([]byte{'a'}, n), bytes.Repeat([]byte{'b'}, n)
	if err := s.WriteAt(1, a, 0); err != nil {
		t.Fatal(err)
	}
	done, stop := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for i := range 3000 {
			select {
			case <-stop:
				return
			default:
			}
			p := a
			if i%2 == 0 {
				p = b
			}
			if err := s.WriteAt(1, p, 0); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	defer func() { close(stop); <-done }()
	buf := make([]byte, n)
	for reads := 0; ; reads++ {
		select {
		case <-done:
			t.Logf("%d reads", reads)
			return
		default:
		}
		if err := s.ReadAt(1, buf, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, a) && !bytes.Equal(buf, b) {
			k := bytes.IndexFunc(buf, func(r rune) bool { return byte(r) != buf[0] })
			t.Fatalf("read %d saw part of a write: %d bytes of %q, then %q", reads, k, buf[0], buf[k])
		}
	}
}

// TestReadsDoNotOverlapAChunksFdatasync: a read of a chunk waits for the
// chunk's fdatasync in progress. When an fdatasync fails the file may be
// back at its last synced state from that instant, and a read overlapping
// it could return that past before anyone knows of the failure (Sync's
// failed callback runs before reads of the chunk go on).
func TestReadsDoNotOverlapAChunksFdatasync(t *testing.T) {
	e := newEnv(t, 2, 2)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	s := e.open(t, Options{TestingKnobs: TestingKnobs{BeforeFdatasync: func(id uint64) {
		if id == 1 {
			once.Do(func() { close(entered); <-release })
		}
	}}})
	for id := uint64(1); id <= 2; id++ {
		if err := s.WriteAt(id, pattern(byte(id), testBlock), 0); err != nil {
			t.Fatal(err)
		}
	}
	synced := make(chan error, 1)
	go func() { synced <- s.Sync(nil) }()
	<-entered // chunk 1's fdatasync is about to run
	read := func(id uint64) <-chan error {
		done := make(chan error, 1)
		go func() { done <- s.ReadAt(id, make([]byte, testBlock), 0) }()
		return done
	}
	other, same := read(2), read(1)
	if err := <-other; err != nil { // another chunk reads meanwhile
		t.Fatal(err)
	}
	select {
	case err := <-same:
		close(release)
		t.Fatalf("a read of chunk 1 completed during its fdatasync (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-same; err != nil {
		t.Fatal(err)
	}
	if err := <-synced; err != nil {
		t.Fatal(err)
	}
}
