package faultfs

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// TestNamespaceOperations: the operations Cairn uses on names work through
// the mount, including renameat2 with RENAME_NOREPLACE, and are kept by a
// crash.
func TestNamespaceOperations(t *testing.T) {
	f := MountForTest(t, Options{})
	for _, d := range []string{"clean", "dirty"} {
		if err := os.Mkdir(f.Path(d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	createSynced(t, f, "clean/1", []byte("one"))
	createSynced(t, f, "clean/2", []byte("two"))
	createSynced(t, f, "dirty/2", []byte("taken"))

	if err := fsutil.RenameNoReplace(f.Path("clean/1"), f.Path("dirty/1")); err != nil {
		t.Fatalf("rename no-replace: %v", err)
	}
	if err := fsutil.RenameNoReplace(f.Path("clean/2"), f.Path("dirty/2")); !fsutil.IsExist(err) {
		t.Fatalf("rename no-replace onto an existing file: %v, want EEXIST", err)
	}
	checkContent(t, f, "dirty/2", []byte("taken"))
	if err := fsutil.SyncDir(f.Path("dirty")); err != nil {
		t.Fatal(err)
	}
	if err := fsutil.WriteFileAtomic(f.Path("meta"), []byte("v1"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := fsutil.WriteFileAtomic(f.Path("meta"), []byte("v2"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(f.Path("clean/2"), f.Path("dirty/2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.Path("dirty/1")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.Path("clean")); err != nil {
		t.Fatal(err)
	}
	if st := f.Stats(); st.DirSyncs < 3 {
		t.Fatalf("%d directory syncs counted, want at least 3", st.DirSyncs)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(f.Path(), &sfs); err != nil || sfs.Blocks == 0 {
		t.Fatalf("statfs: %+v, %v", sfs, err)
	}

	crash(t, f, CrashOptions{})
	names := func(dir string) []string {
		ents, err := os.ReadDir(f.Path(dir))
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	if got := names(""); !slices.Equal(got, []string{"dirty", "meta"}) {
		t.Fatalf("root holds %v", got)
	}
	if got := names("dirty"); !slices.Equal(got, []string{"2"}) {
		t.Fatalf("dirty holds %v", got)
	}
	checkContent(t, f, "dirty/2", []byte("two"))
	checkContent(t, f, "meta", []byte("v2"))
}

// TestFlock: directory (and file) flocks taken through the mount exclude
// each other, as Cairn's pool and datastore locks need, and are released
// with their descriptor.
func TestFlock(t *testing.T) {
	f := MountForTest(t, Options{})
	if err := os.Mkdir(f.Path("pool"), 0o755); err != nil {
		t.Fatal(err)
	}
	a, err := os.Open(f.Path("pool"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.Open(f.Path("pool"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := unix.Flock(int(a.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("first lock: %v", err)
	}
	if err := unix.Flock(int(b.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("second lock: %v, want EWOULDBLOCK", err)
	}
	a.Close()
	if err := unix.Flock(int(b.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("lock after the holder closed: %v", err)
	}

	// Regular files too.
	createSynced(t, f, "pool/pool.meta", []byte("x"))
	c, d := openRW(t, f, "pool/pool.meta"), openRW(t, f, "pool/pool.meta")
	if err := unix.Flock(int(c.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatalf("file lock: %v", err)
	}
	if err := unix.Flock(int(d.Fd()), unix.LOCK_SH|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("second file lock: %v, want EWOULDBLOCK", err)
	}
}

// TestFilesAreDirectIO: the kernel caches no file data of the mount (files
// are opened in direct-IO mode), which shows in shared mmap being refused.
func TestFilesAreDirectIO(t *testing.T) {
	f := MountForTest(t, Options{})
	createSynced(t, f, "a", make([]byte, PageSize))
	fd := openRW(t, f, "a")
	if b, err := unix.Mmap(int(fd.Fd()), 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
		unix.Munmap(b)
		t.Fatal("shared mmap of a file in the mount succeeded: the kernel caches its pages")
	}
}

// TestFallocate: fallocate passes through; punching a hole is undone by a
// crash like a write.
func TestFallocate(t *testing.T) {
	f := MountForTest(t, Options{})
	old := randBytes(60, 4*PageSize)
	createSynced(t, f, "a", old)
	fd := openRW(t, f, "a")
	if err := unix.Fallocate(int(fd.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, PageSize, 2*PageSize); err != nil {
		t.Fatalf("punch hole: %v", err)
	}
	if err := unix.Fallocate(int(fd.Fd()), 0, 0, 8*PageSize); err != nil {
		t.Fatalf("fallocate: %v", err)
	}
	want := append(append(append([]byte(nil), old[:PageSize]...), make([]byte, 2*PageSize)...), old[3*PageSize:]...)
	want = append(want, make([]byte, 4*PageSize)...)
	checkContent(t, f, "a", want)
	crash(t, f, CrashOptions{})
	checkContent(t, f, "a", old)
}

// TestRemovedFileIsForgotten: the pre-images of a file that loses its last
// name (unlink, or rename over it) are dropped.
func TestRemovedFileIsForgotten(t *testing.T) {
	f := MountForTest(t, Options{})
	for _, name := range []string{"a", "b", "c"} {
		createSynced(t, f, name, randBytes(70, 2*PageSize))
		writeAt(t, openRW(t, f, name), []byte("unsynced"), 0)
	}
	if st := f.Stats(); st.UnsyncedFiles != 3 || st.UnsyncedBytes != 3*PageSize {
		t.Fatalf("before: %+v", st)
	}
	if err := os.Remove(f.Path("a")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(f.Path("b"), f.Path("c")); err != nil {
		t.Fatal(err)
	}
	// c's old inode is gone; b's data now under the name c stays tracked.
	if st := f.Stats(); st.UnsyncedFiles != 1 || st.UnsyncedBytes != PageSize {
		t.Fatalf("after remove and rename: %d files, %d bytes; want 1 file, %d bytes", st.UnsyncedFiles, st.UnsyncedBytes, PageSize)
	}
	crash(t, f, CrashOptions{})
	checkContent(t, f, "c", randBytes(70, 2*PageSize))
}

// TestConcurrentWriters: several writers, each on its own file, write and
// sometimes sync; after a crash every file holds exactly its content at its
// last sync.
func TestConcurrentWriters(t *testing.T) {
	f := MountForTest(t, Options{})
	const writers, ops, size = 6, 300, 16 * PageSize
	synced := make([][]byte, writers)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			name := fmt.Sprintf("f%d", w)
			fd, err := os.OpenFile(f.Path(name), os.O_CREATE|os.O_RDWR, 0o644)
			if err != nil {
				errs <- err
				return
			}
			defer fd.Close()
			cur := []byte{}
			for i := range ops {
				off := r.IntN(size)
				data := randBytes(uint64(w*ops+i), 1+r.IntN(3*PageSize))
				if _, err := fd.WriteAt(data, int64(off)); err != nil {
					errs <- err
					return
				}
				if end := off + len(data); end > len(cur) {
					cur = append(cur, make([]byte, end-len(cur))...)
				}
				copy(cur[off:], data)
				if r.IntN(8) == 0 {
					if err := unix.Fdatasync(int(fd.Fd())); err != nil {
						errs <- err
						return
					}
					synced[w] = append([]byte(nil), cur...)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if f.Stats().UnsyncedFiles == 0 {
		t.Fatal("no writer left unsynced data: the test proves nothing")
	}
	crash(t, f, CrashOptions{})
	for w := range writers {
		checkContent(t, f, fmt.Sprintf("f%d", w), synced[w])
	}
}

// TestUnsyncedLimit: a write that finds the pre-image memory at its bound
// waits for a sync elsewhere, and fails loudly with EIO when none comes.
func TestUnsyncedLimit(t *testing.T) {
	const limit = 16 * PageSize
	f := MountForTest(t, Options{MaxUnsyncedBytes: limit, UnsyncedWait: DefaultUnsyncedWait})
	createSynced(t, f, "a", make([]byte, 2*limit))
	createSynced(t, f, "b", make([]byte, 2*limit))
	a, b := openRW(t, f, "a"), openRW(t, f, "b")
	writeAt(t, a, randBytes(80, limit), 0)
	if st := f.Stats(); st.UnsyncedBytes != limit {
		t.Fatalf("%d bytes held, want %d", st.UnsyncedBytes, limit)
	}
	// b's write can only proceed once a's sync frees the memory.
	done := make(chan error, 1)
	go func() {
		_, err := b.WriteAt(randBytes(81, PageSize), 0)
		done <- err
	}()
	if err := a.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("held-back write: %v", err)
	}

	// With nobody to sync, the write fails after the wait.
	g := MountForTest(t, Options{MaxUnsyncedBytes: limit, UnsyncedWait: 50 * time.Millisecond, Logger: slog.New(slog.DiscardHandler)})
	createSynced(t, g, "c", make([]byte, 2*limit))
	c := openRW(t, g, "c")
	writeAt(t, c, randBytes(82, limit), 0)
	if _, err := c.WriteAt([]byte("x"), limit); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write over the limit: %v, want EIO", err)
	}
	if st := g.Stats(); st.LimitFailures != 1 {
		t.Fatalf("%d limit failures counted, want 1", st.LimitFailures)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	writeAt(t, c, []byte("x"), limit)
}

// TestMountRefusesBadDirectories: overlapping or missing directories get a
// clear error and nothing is mounted.
func TestMountRefusesBadDirectories(t *testing.T) {
	RequireFUSE(t)
	dir := t.TempDir()
	sub := dir + "/sub"
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, c := range [][2]string{{dir, sub}, {sub, dir}, {dir, dir}, {dir + "/missing", sub}, {"", sub}} {
		if f, err := Mount(c[0], c[1], Options{}); err == nil {
			f.Unmount()
			t.Errorf("Mount(%q, %q) succeeded", c[0], c[1])
		}
	}
	if _, err := Mount(dir, sub, Options{MaxUnsyncedBytes: -1}); err == nil {
		t.Error("Mount with a negative limit succeeded")
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(mounts, []byte(dir)) {
		t.Fatalf("a refused mount is mounted:\n%s", mounts)
	}
}
