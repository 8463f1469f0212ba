package chunkfilepool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/internal/soon"
)

// Small geometry so that tests stay fast: 64 KiB of data + 4 KiB meta page.
const (
	testChunk = 64 << 10
	testMeta  = 4 << 10
	testFile  = testChunk + testMeta
)

func testOptions(dir string) Options {
	return Options{
		Dir:          dir,
		ChunkSize:    testChunk,
		MetaPageSize: testMeta,
		BlockSize:    512,
		LowWater:     1,
		GrowBy:       1,
		GetTimeout:   time.Minute,
	}
}

func openPool(t *testing.T, o Options) *Pool {
	t.Helper()
	p, err := Open(o)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func waitStats(t *testing.T, p *Pool, cond func(Stats) bool) Stats {
	t.Helper()
	var st Stats
	soon.Succeeds(t, 30*time.Second, func() error {
		st = p.Stats()
		if !cond(st) {
			return fmt.Errorf("stats %+v", st)
		}
		return nil
	})
	return st
}

// checkZeroFile asserts that path is a whole pool file of zeros.
func checkZeroFile(t *testing.T, path string, size int64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != size {
		t.Fatalf("%s is %d bytes, want %d", path, len(b), size)
	}
	if i := bytes.IndexFunc(b, func(r rune) bool { return r != 0 }); i >= 0 {
		t.Fatalf("%s has a non-zero byte at %d", path, i)
	}
}

func fillFile(t *testing.T, path string, b byte) {
	t.Helper()
	if err := os.WriteFile(path, bytes.Repeat([]byte{b}, testFile), 0o644); err != nil {
		t.Fatal(err)
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func TestFormatGetRecycle(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 4
	o.MaxChunks = 6
	p := openPool(t, o)
	if p.FileSize() != testFile || p.ChunkSize() != testChunk || p.MetaPageSize() != testMeta || p.BlockSize() != 512 {
		t.Fatalf("geometry %+v", p.Geometry())
	}
	st := waitStats(t, p, func(s Stats) bool { return s.Clean == 4 && s.FormatPercent == 100 })
	if st.Owned != 4 || st.InUse != 0 || st.Dirty != 0 || st.Formatting != 0 || st.Target != 4 {
		t.Fatalf("after format: %+v", st)
	}
	ents, err := os.ReadDir(filepath.Join(o.Dir, cleanDirName))
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 4 {
		t.Fatalf("clean dir holds %d files", len(ents))
	}
	for _, e := range ents {
		checkZeroFile(t, filepath.Join(o.Dir, cleanDirName, e.Name()), testFile)
	}

	dst := filepath.Join(root, "chunk_1")
	if err := p.Get(dst); err != nil {
		t.Fatal(err)
	}
	checkZeroFile(t, dst, testFile)
	st = p.Stats()
	if st.Clean != 3 || st.InUse != 1 {
		t.Fatalf("after get: %+v", st)
	}

	// An existing destination is never overwritten and no file moves.
	taken := filepath.Join(root, "taken")
	if err := os.WriteFile(taken, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := p.Get(taken); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("get onto existing file: %v, want fs.ErrExist", err)
	}
	if b, _ := os.ReadFile(taken); string(b) != "keep me" {
		t.Fatalf("existing file overwritten: %q", b)
	}
	if st := p.Stats(); st.Clean != 3 || st.InUse != 1 {
		t.Fatalf("after refused get: %+v", st)
	}

	if err := p.Recycle(dst); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("recycled file still at its place: %v", err)
	}
	waitStats(t, p, func(s Stats) bool { return s.Clean == 4 && s.Dirty == 0 && s.InUse == 0 })

	// Not a regular file: refused, left in place.
	sub := filepath.Join(root, "subdir")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := p.Recycle(sub); err == nil {
		t.Fatal("recycling a directory succeeded")
	}
	if _, err := os.Stat(sub); err != nil {
		t.Fatalf("directory moved: %v", err)
	}
	if err := p.Recycle(filepath.Join(root, "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("recycle missing file: %v", err)
	}
}

func TestZeroOnReuse(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 1
	o.MaxChunks = 1
	p := openPool(t, o)

	a := filepath.Join(root, "a")
	if err := p.Get(a); err != nil {
		t.Fatal(err)
	}
	ino := inode(t, a)
	fillFile(t, a, 0xAB)
	if err := p.Recycle(a); err != nil {
		t.Fatal(err)
	}
	// The only file is dirty; Get waits for it to be zeroed.
	b := filepath.Join(root, "b")
	if err := p.Get(b); err != nil {
		t.Fatal(err)
	}
	if inode(t, b) != ino {
		t.Fatal("second Get did not reuse the recycled file")
	}
	checkZeroFile(t, b, testFile)

	// A file of another size comes back at the pool's size, zeroed.
	if err := os.Truncate(b, 100); err != nil {
		t.Fatal(err)
	}
	if err := p.Recycle(b); err != nil {
		t.Fatal(err)
	}
	c := filepath.Join(root, "c")
	if err := p.Get(c); err != nil {
		t.Fatal(err)
	}
	checkZeroFile(t, c, testFile)
}

func TestSizeLimitedPoolIsEmptyAtOnce(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 2
	o.MaxChunks = 2
	p := openPool(t, o)
	for i := range 2 {
		if err := p.Get(filepath.Join(root, fmt.Sprint("c", i))); err != nil {
			t.Fatal(err)
		}
	}
	dst := filepath.Join(root, "c2")
	err := p.Get(dst)
	if !errors.Is(err, ErrPoolEmpty) || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("get from exhausted pool: %v, want ErrPoolEmpty without waiting", err)
	}
	if !strings.Contains(err.Error(), "maximum of 2") {
		t.Fatalf("error does not say why: %v", err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("failed get left a file: %v", err)
	}
	if st := p.Stats(); st.InUse != 2 || st.Owned != 2 || st.Clean != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestGrowsOnDemand(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 0
	o.LowWater = 2
	o.GrowBy = 2
	o.MaxChunks = 5
	p := openPool(t, o)
	// Growable: what the pool may still create, up to MaxChunks.
	waitStats(t, p, func(s Stats) bool { return s.Clean == 2 && s.Owned == 2 && s.FormatPercent == 100 && s.Growable == 3 })
	if err := p.Get(filepath.Join(root, "c0")); err != nil {
		t.Fatal(err)
	}
	// One clean left, below the low water mark of 2: the pool grows by 2.
	waitStats(t, p, func(s Stats) bool { return s.Clean == 3 && s.Owned == 4 && s.InUse == 1 && s.Growable == 1 })
	for i := 1; i < 5; i++ {
		if err := p.Get(filepath.Join(root, fmt.Sprint("c", i))); err != nil {
			t.Fatalf("get %d: %v", i, err)
		}
	}
	if err := p.Get(filepath.Join(root, "c5")); !errors.Is(err, ErrPoolEmpty) {
		t.Fatalf("get beyond MaxChunks: %v", err)
	}
	if st := p.Stats(); st.Owned != 5 || st.InUse != 5 || st.FormatPercent != 100 || st.Growable != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestConcurrentGet(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 10
	o.MaxChunks = 30
	p := openPool(t, o)
	const getters = 40
	errs := make([]error, getters)
	var wg sync.WaitGroup
	for i := range getters {
		wg.Go(func() { errs[i] = p.Get(filepath.Join(root, fmt.Sprint("chunk_", i))) })
	}
	wg.Wait()
	got := 0
	inodes := map[uint64]bool{}
	for i, err := range errs {
		switch {
		case err == nil:
			got++
			path := filepath.Join(root, fmt.Sprint("chunk_", i))
			checkZeroFile(t, path, testFile)
			ino := inode(t, path)
			if inodes[ino] {
				t.Fatalf("file handed out twice (inode %d)", ino)
			}
			inodes[ino] = true
		case errors.Is(err, ErrPoolEmpty):
		default:
			t.Fatalf("get %d: %v", i, err)
		}
	}
	if got != 30 {
		t.Fatalf("%d gets succeeded, want exactly MaxChunks=30", got)
	}
	if st := p.Stats(); st.InUse != 30 || st.Clean != 0 || st.Owned != 30 {
		t.Fatalf("stats %+v", st)
	}
}

func TestGetDeadlineWhileFormatting(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 1
	o.FormatBytesPerSec = 1 << 10 // 68 s for one file
	p := openPool(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := p.GetContext(ctx, filepath.Join(root, "c"))
	if !errors.Is(err, ErrPoolEmpty) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("get past deadline: %v", err)
	}
	// Close interrupts the throttled format; the file is redone later.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Get(filepath.Join(root, "d")); !errors.Is(err, ErrClosed) {
		t.Fatalf("get after close: %v", err)
	}
}

// blockAt returns a BeforeWrite knob that, on the first write at a non-zero
// offset into the file whose base name is file, signals reached and waits for
// release, then fails the write.
func blockAt(file string) (knob func(string, int64) error, reached, release chan struct{}) {
	reached, release = make(chan struct{}), make(chan struct{})
	var once sync.Once
	knob = func(name string, off int64) error {
		if filepath.Base(name) != file || off == 0 {
			return nil
		}
		hit := false
		once.Do(func() { hit = true })
		if !hit {
			return nil
		}
		close(reached)
		<-release
		return errors.New("test: write interrupted")
	}
	return knob, reached, release
}

func TestServesWhileFormattingAndReportsProgress(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.ChunkSize = 1 << 20 // two writes per file, so a file can be paused half way
	o.InitialChunks = 4
	knob, reached, release := blockAt("3")
	o.TestingKnobs.BeforeWrite = knob
	p := openPool(t, o)
	<-reached
	st := p.Stats()
	fileSize := int64(1<<20 + testMeta)
	wantPct := int((2*fileSize + 1<<20) * 100 / (4 * fileSize))
	if st.Clean != 2 || st.Formatting != 1 || st.Target != 4 || st.FormatPercent != wantPct {
		t.Fatalf("paused at file 3: %+v, want 2 clean, 1 formatting, %d%%", st, wantPct)
	}
	// The pool serves while formatting goes on.
	for i := range 2 {
		if err := p.Get(filepath.Join(root, fmt.Sprint("c", i))); err != nil {
			t.Fatal(err)
		}
	}
	close(release)
	// The injected failure stops growth; an empty Get lifts the limit and
	// the file is formatted again from the start.
	waitStats(t, p, func(s Stats) bool { return s.Limit != "" })
	if err := p.Get(filepath.Join(root, "c2")); err != nil {
		t.Fatal(err)
	}
	// Three files were taken in the last seconds: the pool keeps three ready.
	st = waitStats(t, p, func(s Stats) bool { return s.FormatPercent == 100 && s.Clean == 3 })
	if st.InUse != 3 || st.Owned != 6 || st.Limit != "" {
		t.Fatalf("after format: %+v", st)
	}
	for i := range 3 {
		checkZeroFile(t, filepath.Join(root, fmt.Sprint("c", i)), fileSize)
	}
}

func TestRestartInTheMiddleOfFormatting(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.ChunkSize = 1 << 20
	o.InitialChunks = 3
	fileSize := int64(1<<20 + testMeta)
	knob, reached, release := blockAt("2")
	o.TestingKnobs.BeforeWrite = knob
	p, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	<-reached
	closed := make(chan error)
	go func() { closed <- p.Close() }()
	// Let the interrupted write return only once Close has cancelled the
	// worker, as a crash or shutdown in the middle of a file would.
	soon.Succeeds(t, 30*time.Second, func() error {
		if p.ctx.Err() == nil {
			return errors.New("pool context not cancelled yet")
		}
		return nil
	})
	close(release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	half := filepath.Join(o.Dir, fmtDirName, "2")
	fi, err := os.Stat(half)
	if err != nil {
		t.Fatalf("half-formatted file: %v", err)
	}
	if fi.Size() >= fileSize {
		t.Fatalf("half-formatted file is %d bytes", fi.Size())
	}
	ents, _ := os.ReadDir(filepath.Join(o.Dir, cleanDirName))
	if len(ents) != 1 {
		t.Fatalf("clean holds %d files, want 1", len(ents))
	}

	o.TestingKnobs.BeforeWrite = nil
	p = openPool(t, o)
	st := p.Stats()
	if st.Owned != 2 || st.Target != 3 {
		t.Fatalf("reopened: %+v", st)
	}
	st = waitStats(t, p, func(s Stats) bool { return s.Clean == 3 && s.FormatPercent == 100 })
	if st.Owned != 3 || st.Formatting != 0 {
		t.Fatalf("after resume: %+v", st)
	}
	if ents, _ := os.ReadDir(filepath.Join(o.Dir, fmtDirName)); len(ents) != 0 {
		t.Fatalf("formatting dir not empty: %v", ents)
	}
	for i := range 3 {
		dst := filepath.Join(root, fmt.Sprint("c", i))
		if err := p.Get(dst); err != nil {
			t.Fatal(err)
		}
		checkZeroFile(t, dst, fileSize)
	}
}

// TestCrashLeftovers builds the directory states a crash can leave and checks
// that the next Open never hands out a file that was not fully zeroed.
func TestCrashLeftovers(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 2
	o.MaxChunks = 5
	p := openPool(t, o)
	waitStats(t, p, func(s Stats) bool { return s.Clean == 2 && s.FormatPercent == 100 })
	inUse := filepath.Join(root, "inuse")
	if err := p.Get(inUse); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	// A file created just before a crash, before its count was recorded,
	// half written with garbage; and a chunk that was recycled (renamed
	// into dirty/) but not zeroed.
	if err := os.WriteFile(filepath.Join(o.Dir, fmtDirName, "3"), bytes.Repeat([]byte{0xEE}, testFile/2), 0o644); err != nil {
		t.Fatal(err)
	}
	fillFile(t, inUse, 0xDD)
	if err := os.Rename(inUse, filepath.Join(o.Dir, dirtyDirName, "r7")); err != nil {
		t.Fatal(err)
	}

	o.InitialChunks = 0
	o.MaxChunks = 3
	// Hold the formatter's first write until the state found at open has
	// been read: on a fast disk it would otherwise be done already.
	release := make(chan struct{})
	o.TestingKnobs.BeforeWrite = func(string, int64) error { <-release; return nil }
	p = openPool(t, o)
	st := p.Stats()
	close(release)
	if st.Owned != 3 || st.InUse != 0 || st.Formatting != 1 || st.Dirty != 1 || st.Clean != 1 {
		t.Fatalf("reopened: %+v", st)
	}
	waitStats(t, p, func(s Stats) bool { return s.Clean == 3 && s.Dirty == 0 && s.Formatting == 0 })
	for i := range 3 {
		dst := filepath.Join(root, fmt.Sprint("c", i))
		if err := p.Get(dst); err != nil {
			t.Fatal(err)
		}
		checkZeroFile(t, dst, testFile)
	}
	// A later recycle does not collide with the leftover's name.
	if err := p.Recycle(filepath.Join(root, "c0")); err != nil {
		t.Fatal(err)
	}
	waitStats(t, p, func(s Stats) bool { return s.Clean == 1 })
	if _, err := os.Stat(filepath.Join(o.Dir, cleanDirName, "r8")); err != nil {
		t.Fatalf("recycled file name: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p = openPool(t, o)
	if st := p.Stats(); st.InUse != 2 || st.Clean != 1 || st.Owned != 3 {
		t.Fatalf("accounting after restart: %+v", st)
	}
}

func TestConfigMismatchIsRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	o := testOptions(dir)
	o.InitialChunks = 1
	p := openPool(t, o)
	waitStats(t, p, func(s Stats) bool { return s.Clean == 1 })
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	metaPath := filepath.Join(dir, metaFileName)
	before, err := os.ReadFile(metaPath)
	if err != nil {
		t.Fatal(err)
	}

	for _, change := range []func(*Options){
		func(o *Options) { o.ChunkSize *= 2 },
		func(o *Options) { o.MetaPageSize = 8 << 10 },
		func(o *Options) { o.BlockSize = 4096 },
	} {
		bad := o
		change(&bad)
		_, err := Open(bad)
		if !errors.Is(err, ErrConfigMismatch) {
			t.Fatalf("open with %+v: %v, want ErrConfigMismatch", bad, err)
		}
		if !strings.Contains(err.Error(), "chunk size 65536") {
			t.Fatalf("error does not name the pool's geometry: %v", err)
		}
	}
	after, _ := os.ReadFile(metaPath)
	if !bytes.Equal(before, after) {
		t.Fatal("refused open changed the pool meta")
	}

	// A damaged meta file is not trusted.
	bad := bytes.Clone(before)
	bad[20] ^= 1
	if err := os.WriteFile(metaPath, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(o); !errors.Is(err, ErrBadMeta) {
		t.Fatalf("open with corrupt meta: %v, want ErrBadMeta", err)
	}
	// Pool directories without a meta file are not a pool to format over.
	if err := os.Remove(metaPath); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(o); !errors.Is(err, ErrBadMeta) {
		t.Fatalf("open without meta: %v, want ErrBadMeta", err)
	}
}

func TestOpenIsExclusive(t *testing.T) {
	o := testOptions(filepath.Join(t.TempDir(), "pool"))
	p := openPool(t, o)
	if _, err := Open(o); !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: %v, want ErrLocked", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	openPool(t, o)
}

func TestInvalidOptions(t *testing.T) {
	dir := t.TempDir()
	for _, o := range []Options{
		{},
		{Dir: dir, ChunkSize: 1000},
		{Dir: dir, BlockSize: 1000},
		{Dir: dir, BlockSize: 256},
		{Dir: dir, MetaPageSize: 100},
		{Dir: dir, InitialChunks: 3, MaxChunks: 2},
		{Dir: dir, ReserveBytes: -1},
	} {
		if _, err := Open(o); !errors.Is(err, ErrInvalidOptions) {
			t.Fatalf("open %+v: %v, want ErrInvalidOptions", o, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("invalid options created files: %v", ents)
	}
}

// mountTmpfs mounts a tmpfs of the given size at a fresh directory and
// unmounts it when the test ends. It skips the test when mounting is not
// permitted (not root).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("cairn-test", dir, "tmpfs", 0, "size="+size); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("mounting a size-limited tmpfs needs root: %v", err)
		}
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func TestGrowableIsWhatTheDiskHolds(t *testing.T) {
	mnt := mountTmpfs(t, "1m") // room for fifteen 68 KiB files
	o := testOptions(filepath.Join(mnt, "pool"))
	o.InitialChunks = 2
	o.ReserveBytes = 200 << 10
	p := openPool(t, o)
	st := waitStats(t, p, func(s Stats) bool { return s.Owned == 2 && s.FormatPercent == 100 })
	var fs unix.Statfs_t
	if err := unix.Statfs(mnt, &fs); err != nil {
		t.Fatal(err)
	}
	want := (int64(fs.Bavail)*fs.Bsize - o.ReserveBytes) / testFile
	if int64(st.Growable) != want || want <= 0 {
		t.Fatalf("growable %d, want %d (free space above the reserve, in files)", st.Growable, want)
	}
}

func TestDiskFullStopsGrowth(t *testing.T) {
	mnt := mountTmpfs(t, "300k") // room for four 68 KiB files
	o := testOptions(filepath.Join(mnt, "pool"))
	o.InitialChunks = 10
	p := openPool(t, o)
	st := waitStats(t, p, func(s Stats) bool { return s.Limit != "" })
	if !strings.Contains(st.Limit, "disk full") || st.Owned < 3 || st.Owned > 4 || st.Target != st.Owned || st.Growable != 0 {
		t.Fatalf("stats when full: %+v", st)
	}
	owned := st.Owned
	for i := range owned {
		if err := p.Get(filepath.Join(mnt, fmt.Sprint("c", i))); err != nil {
			t.Fatalf("get %d: %v", i, err)
		}
	}
	err := p.Get(filepath.Join(mnt, "more"))
	if !errors.Is(err, ErrPoolEmpty) || errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("get on full disk: %v, want ErrPoolEmpty saying disk full, at once", err)
	}
	// A recycled file can be reused without new space.
	if err := p.Recycle(filepath.Join(mnt, "c0")); err != nil {
		t.Fatal(err)
	}
	if err := p.Get(filepath.Join(mnt, "again")); err != nil {
		t.Fatal(err)
	}
	checkZeroFile(t, filepath.Join(mnt, "again"), testFile)
}

func TestENOSPCWhileFormattingLeavesNothingHalfDone(t *testing.T) {
	mnt := mountTmpfs(t, "300k")
	o := testOptions(filepath.Join(mnt, "pool"))
	o.InitialChunks = 10
	o.TestingKnobs.SkipSpaceCheck = true // reach the filesystem's own ENOSPC
	p := openPool(t, o)
	st := waitStats(t, p, func(s Stats) bool { return s.Limit != "" })
	if !strings.Contains(st.Limit, "disk full") || st.Formatting != 1 {
		t.Fatalf("stats after ENOSPC: %+v", st)
	}
	// The file that did not fit holds no space and is not handed out.
	ents, err := os.ReadDir(filepath.Join(o.Dir, fmtDirName))
	if err != nil || len(ents) != 1 {
		t.Fatalf("formatting dir: %v %v", ents, err)
	}
	if fi, _ := ents[0].Info(); fi.Size() != 0 {
		t.Fatalf("failed file keeps %d bytes", fi.Size())
	}
	for i := range st.Clean {
		dst := filepath.Join(mnt, fmt.Sprint("c", i))
		if err := p.Get(dst); err != nil {
			t.Fatalf("get %d: %v", i, err)
		}
		checkZeroFile(t, dst, testFile)
	}
	// The next Get retries the failed file, meets ENOSPC again and fails.
	if err := p.Get(filepath.Join(mnt, "more")); !errors.Is(err, ErrPoolEmpty) {
		t.Fatalf("get on full disk: %v", err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "more")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("failed get left a file: %v", err)
	}
}

func TestGrowsAheadOfDemand(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.InitialChunks = 2
	o.LowWater = 1
	o.GrowBy = 1
	p := openPool(t, o)
	waitStats(t, p, func(s Stats) bool { return s.Clean == 2 && s.FormatPercent == 100 })
	// A burst of eight Gets (a fresh volume's first writes): the pool then
	// keeps eight clean files ready for the next burst, not LowWater.
	for i := range 8 {
		if err := p.Get(filepath.Join(root, fmt.Sprint("c", i))); err != nil {
			t.Fatalf("get %d: %v", i, err)
		}
	}
	st := waitStats(t, p, func(s Stats) bool { return s.Clean >= 8 && s.FormatPercent == 100 })
	if st.InUse != 8 {
		t.Fatalf("stats %+v", st)
	}
}
