package faultfs

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestFailSyncLosesDataAndRetrySucceeds: a failed fsync loses the unsynced
// data at once, and the retried fsync on the same descriptor succeeds
// although the data is gone, as Linux reports a writeback error once.
func TestFailSyncLosesDataAndRetrySucceeds(t *testing.T) {
	f := MountForTest(t, Options{})
	if err := os.Mkdir(f.Path("wal"), 0o755); err != nil {
		t.Fatal(err)
	}
	old := randBytes(40, 4*PageSize)
	createSynced(t, f, "wal/seg", old)
	createSynced(t, f, "other", old)

	if _, err := f.FailSync("^wal/", 1); err != nil {
		t.Fatal(err)
	}
	seg, other := openRW(t, f, "wal/seg"), openRW(t, f, "other")
	neu := randBytes(41, PageSize+100)
	writeAt(t, seg, neu, 2*PageSize-50)
	writeAt(t, seg, []byte("appended"), 4*PageSize)
	writeAt(t, other, neu, 0)

	if err := other.Sync(); err != nil {
		t.Fatalf("fsync of a file the rule does not match: %v", err)
	}
	if err := seg.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("first fsync: %v, want EIO", err)
	}
	// The data is gone at once: reads see the state at the last sync.
	checkContent(t, f, "wal/seg", old)
	if err := seg.Sync(); err != nil {
		t.Fatalf("retried fsync: %v, want success", err)
	}
	st := f.Stats()
	if st.SyncFaults != 1 || st.PagesLostToSyncs != 3 {
		t.Fatalf("stats %+v: want 1 sync fault and 3 pages lost (1, 2 and 3)", st)
	}
	// The retried fsync acknowledged nothing: a crash finds the old data.
	crash(t, f, CrashOptions{})
	checkContent(t, f, "wal/seg", old)
	want := append([]byte(nil), old...)
	copy(want, neu)
	checkContent(t, f, "other", want)

	// The rule was used up: later syncs work and make data durable.
	seg = openRW(t, f, "wal/seg")
	writeAt(t, seg, neu, 0)
	if err := seg.Sync(); err != nil {
		t.Fatal(err)
	}
	crash(t, f, CrashOptions{})
	checkContent(t, f, "wal/seg", want)
}

// TestFailWritesAndReads: write and read rules fail matching requests with
// the chosen errno, count down, and stop when removed.
func TestFailWritesAndReads(t *testing.T) {
	f := MountForTest(t, Options{})
	createSynced(t, f, "chunk", randBytes(50, PageSize))
	createSynced(t, f, "meta", randBytes(51, PageSize))
	fd := openRW(t, f, "chunk")

	if _, err := f.FailWrites("chunk$", 2, syscall.ENOSPC); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if _, err := fd.WriteAt([]byte("x"), 0); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("write %d: %v, want ENOSPC", i, err)
		}
	}
	checkContent(t, f, "chunk", randBytes(50, PageSize)) // failed writes wrote nothing
	writeAt(t, fd, []byte("x"), 0)

	id, err := f.FailReads("", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"chunk", "meta"} {
		if _, err := os.ReadFile(f.Path(name)); !errors.Is(err, syscall.EIO) {
			t.Fatalf("read %s: %v, want EIO", name, err)
		}
	}
	if !f.RemoveRule(id) || f.RemoveRule(id) {
		t.Fatal("RemoveRule did not report the rule installed exactly once")
	}
	if _, err := os.ReadFile(f.Path("meta")); err != nil {
		t.Fatalf("read after the rule was removed: %v", err)
	}
	if _, err := f.FailWrites("", 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := fd.WriteAt([]byte("y"), 1); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write under an EIO rule: %v", err)
	}
	f.ClearRules()
	writeAt(t, fd, []byte("y"), 1)
	if st := f.Stats(); st.WriteFaults != 3 || st.ReadFaults != 2 {
		t.Fatalf("stats %+v: want 3 write and 2 read faults", st)
	}
}

// TestBadRulesAreRefused: bad input gets ErrBadRule and installs nothing.
func TestBadRulesAreRefused(t *testing.T) {
	f := MountForTest(t, Options{})
	bad := map[string]func() error{
		"pattern":     func() error { _, err := f.FailSync("(", 1); return err },
		"count":       func() error { _, err := f.FailReads("", -1); return err },
		"write errno": func() error { _, err := f.FailWrites("", 1, syscall.EPERM); return err },
	}
	for name, add := range bad {
		if err := add(); !errors.Is(err, ErrBadRule) {
			t.Errorf("%s: %v, want ErrBadRule", name, err)
		}
	}
	createSynced(t, f, "a", []byte("a"))
	if _, err := os.ReadFile(f.Path("a")); err != nil {
		t.Fatalf("a refused rule was installed: %v", err)
	}
}

// TestCrashAtSync: the power is cut at the nth matching sync, between the
// writes it would have made durable and the sync itself.
func TestCrashAtSync(t *testing.T) {
	f := MountForTest(t, Options{})
	createSynced(t, f, "log", nil)
	createSynced(t, f, "other", nil)
	if _, err := f.CrashAtSync("^log$", 2, CrashOptions{}); err != nil {
		t.Fatal(err)
	}
	fd, other := openRW(t, f, "log"), openRW(t, f, "other")
	first := randBytes(100, 3000)
	writeAt(t, fd, first, 0)
	writeAt(t, other, first, 0)
	if err := other.Sync(); err != nil {
		t.Fatalf("sync of a file the rule does not match: %v", err)
	}
	if err := fd.Sync(); err != nil {
		t.Fatalf("first sync: %v", err)
	}
	writeAt(t, fd, randBytes(101, 9000), 3000)
	if err := fd.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("second sync: %v, want EIO", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	rep, err := f.WaitCrash(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Files != 1 {
		t.Fatalf("crash report %+v: want the one unsynced file", rep)
	}
	if _, err := os.Stat(f.Path("log")); !errors.Is(err, syscall.EIO) {
		t.Fatalf("stat after the cut: %v, want EIO", err)
	}
	f.Restart()
	checkContent(t, f, "log", first)
	checkContent(t, f, "other", first)

	bad := []func() error{
		func() error { _, err := f.CrashAtSync("", 0, CrashOptions{}); return err },
		func() error { _, err := f.CrashAtSync("", 1, CrashOptions{Keep: -1}); return err },
		func() error { _, err := f.CrashAtSync("[", 1, CrashOptions{}); return err },
	}
	for i, add := range bad {
		if err := add(); !errors.Is(err, ErrBadRule) {
			t.Errorf("bad CrashAtSync %d: %v, want ErrBadRule", i, err)
		}
	}
	if err := fd.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("sync through a descriptor from before the crash: %v", err)
	}
	fd = openRW(t, f, "log")
	if err := fd.Sync(); err != nil {
		t.Fatalf("sync after restart: %v (a refused rule was installed?)", err)
	}
}
