package faultfs

import (
	"bytes"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSyncedDataSurvivesCrash: data written and fsynced (or fdatasynced)
// through the mount is exactly what the backing file holds after a crash.
func TestSyncedDataSurvivesCrash(t *testing.T) {
	f := MountForTest(t, Options{})
	data := randBytes(1, 3*PageSize+123)
	createSynced(t, f, "a", data)

	// Overwrite across a page boundary and extend, then fdatasync.
	fd := openRW(t, f, "a")
	patch := randBytes(2, PageSize+10)
	writeAt(t, fd, patch, PageSize-5)
	tail := randBytes(3, 2*PageSize)
	writeAt(t, fd, tail, int64(len(data))+PageSize)
	if err := unix.Fdatasync(int(fd.Fd())); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), data...)
	copy(want[PageSize-5:], patch)
	want = append(want, make([]byte, PageSize)...)
	want = append(want, tail...)

	if st := f.Stats(); st.UnsyncedFiles != 0 || st.UnsyncedBytes != 0 || st.Syncs < 2 {
		t.Fatalf("after sync: %+v", st)
	}
	rep := crash(t, f, CrashOptions{})
	if rep.Files != 0 || rep.PagesLost != 0 {
		t.Fatalf("crash restored synced data: %+v", rep)
	}
	checkContent(t, f, "a", want)
}

// TestUnsyncedDataIsLost: a crash puts every file back to exactly its
// content and size at its last sync; a created file never synced is empty.
func TestUnsyncedDataIsLost(t *testing.T) {
	f := MountForTest(t, Options{})
	old := randBytes(10, 5*PageSize+700)
	createSynced(t, f, "a", old)

	fd := openRW(t, f, "a")
	writeAt(t, fd, randBytes(11, 3000), PageSize+2000)   // across pages 1 and 2
	writeAt(t, fd, randBytes(12, 10), 3*PageSize+1)      // inside page 3
	writeAt(t, fd, randBytes(13, 9000), int64(len(old))) // extend from the partial last page
	writeAt(t, fd, randBytes(14, 100), 0)                // page 0
	// Reads see the new data before the crash.
	got := make([]byte, 100)
	if _, err := fd.ReadAt(got, 0); err != nil || !bytes.Equal(got, randBytes(14, 100)) {
		t.Fatalf("read after write: %v", err)
	}

	fresh, err := os.Create(f.Path("fresh"))
	if err != nil {
		t.Fatal(err)
	}
	writeAt(t, fresh, randBytes(15, 3*PageSize), 0)
	fresh.Close()

	st := f.Stats()
	if st.UnsyncedFiles != 2 || st.UnsyncedBytes != 4*PageSize {
		t.Fatalf("before crash: %d files, %d bytes of pre-images; want 2 files, %d bytes", st.UnsyncedFiles, st.UnsyncedBytes, 4*PageSize)
	}
	rep := crash(t, f, CrashOptions{})
	if rep.Files != 2 || rep.PagesLost != 4 {
		t.Fatalf("crash report %+v, want 2 files and 4 pages restored", rep)
	}
	checkContent(t, f, "a", old)
	checkContent(t, f, "fresh", nil)
	if st := f.Stats(); st.UnsyncedFiles != 0 || st.UnsyncedBytes != 0 || st.Crashes != 1 || st.PagesLost != 4 {
		t.Fatalf("after crash: %+v", st)
	}
}

// TestSizeRestored: unsynced truncates (by descriptor, by path, by
// O_TRUNC) and extensions are undone by a crash.
func TestSizeRestored(t *testing.T) {
	f := MountForTest(t, Options{})
	old := randBytes(20, 10000)
	for _, name := range []string{"shrink", "grow", "path", "otrunc"} {
		createSynced(t, f, name, old)
	}

	fd := openRW(t, f, "shrink")
	if err := fd.Truncate(3000); err != nil {
		t.Fatal(err)
	}
	writeAt(t, fd, randBytes(21, 500), 20000) // regrow past the old end
	fd = openRW(t, f, "grow")
	if err := fd.Truncate(50000); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(f.Path("path"), 1); err != nil {
		t.Fatal(err)
	}
	ot, err := os.OpenFile(f.Path("otrunc"), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	writeAt(t, ot, []byte("new"), 0)
	ot.Close()
	if st, err := os.Stat(f.Path("otrunc")); err != nil || st.Size() != 3 {
		t.Fatalf("after O_TRUNC: %v, %v", st, err)
	}

	crash(t, f, CrashOptions{})
	for _, name := range []string{"shrink", "grow", "path", "otrunc"} {
		checkContent(t, f, name, old)
	}
}

// TestPartialCrash: with Keep between 0 and 1 every page holds all old or
// all new content, both kinds occur, and the same seed gives the same
// result on a fresh mount.
func TestPartialCrash(t *testing.T) {
	const pages = 24
	old := randBytes(30, pages*PageSize)
	neu := randBytes(31, (pages+8)*PageSize)
	run := func(seed uint64) []byte {
		f := MountForTest(t, Options{})
		createSynced(t, f, "f", old)
		fd := openRW(t, f, "f")
		// One write across every page and past the end: a torn write.
		writeAt(t, fd, neu, 0)
		rep := crash(t, f, CrashOptions{Keep: 0.5, Seed: seed})
		got, err := os.ReadFile(f.Path("f"))
		if err != nil {
			t.Fatal(err)
		}
		if rep.PagesKept == 0 || rep.PagesLost == 0 {
			t.Fatalf("seed %d: %+v: want some pages kept and some lost", seed, rep)
		}
		if len(got) != len(old) && len(got) != len(neu) {
			t.Fatalf("seed %d: size %d is neither the old %d nor the new %d", seed, len(got), len(old), len(neu))
		}
		var nOld, nNew int
		for p := 0; p*PageSize < len(got); p++ {
			pg := got[p*PageSize : min(len(got), (p+1)*PageSize)]
			switch {
			case bytes.Equal(pg, neu[p*PageSize:(p+1)*PageSize]):
				nNew++
			case p < pages && bytes.Equal(pg, old[p*PageSize:(p+1)*PageSize]):
				nOld++
			case p >= pages && bytes.Equal(pg, make([]byte, PageSize)):
				nOld++ // past the old end the old content is zeros
			default:
				t.Fatalf("seed %d: page %d is neither old nor new", seed, p)
			}
		}
		if nOld == 0 || nNew == 0 {
			t.Fatalf("seed %d: %d old and %d new pages: the write was not torn", seed, nOld, nNew)
		}
		return got
	}
	a, b, c := run(7), run(7), run(8)
	if !bytes.Equal(a, b) {
		t.Fatalf("the same seed gave different results")
	}
	if bytes.Equal(a, c) {
		t.Fatalf("seeds 7 and 8 gave the same result")
	}
}

// TestCrashedFilesystemRefusesEverything: between Crash and Restart every
// operation fails with EIO; afterwards new opens work, and descriptors
// opened before the crash stay dead.
func TestCrashedFilesystemRefusesEverything(t *testing.T) {
	f := MountForTest(t, Options{})
	createSynced(t, f, "a", []byte("durable"))
	if err := os.Mkdir(f.Path("d"), 0o755); err != nil {
		t.Fatal(err)
	}
	old := openRW(t, f, "a")
	if _, err := f.Crash(CrashOptions{}); err != nil {
		t.Fatal(err)
	}
	if !f.Stats().Crashed {
		t.Fatal("Stats.Crashed is false after Crash")
	}
	checks := map[string]func() error{
		"stat":    func() error { _, err := os.Stat(f.Path("a")); return err },
		"open":    func() error { g, err := os.Open(f.Path("a")); g.Close(); return err },
		"create":  func() error { g, err := os.Create(f.Path("b")); g.Close(); return err },
		"readdir": func() error { _, err := os.ReadDir(f.Path("d")); return err },
		"write":   func() error { _, err := old.WriteAt([]byte("x"), 0); return err },
		"read":    func() error { _, err := old.ReadAt(make([]byte, 1), 0); return err },
		"fsync":   func() error { return old.Sync() },
		"rename":  func() error { return os.Rename(f.Path("a"), f.Path("c")) },
		"mkdir":   func() error { return os.Mkdir(f.Path("e"), 0o755) },
		"statfs":  func() error { var s unix.Statfs_t; return unix.Statfs(f.Path("d"), &s) },
	}
	for name, op := range checks {
		if err := op(); !isErrno(err, syscall.EIO) {
			t.Errorf("%s while crashed: %v, want EIO", name, err)
		}
	}
	f.Restart()
	if _, err := old.WriteAt([]byte("x"), 0); !isErrno(err, syscall.EIO) {
		t.Errorf("write through a descriptor from before the crash: %v, want EIO", err)
	}
	checkContent(t, f, "a", []byte("durable"))
	fd := openRW(t, f, "a")
	writeAt(t, fd, []byte("D"), 0)
	if err := fd.Sync(); err != nil {
		t.Fatal(err)
	}
	checkContent(t, f, "a", []byte("Durable"))
	if _, err := f.Crash(CrashOptions{Keep: 2}); err == nil {
		t.Fatal("Crash with Keep 2 succeeded")
	}
	if f.Stats().Crashed {
		t.Fatal("a refused Crash crashed the filesystem")
	}
}
