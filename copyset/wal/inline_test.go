package wal

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/test/faultfs"
)

// syncLog records the group commits of a WAL.
type syncLog struct {
	mu    sync.Mutex
	syncs []SyncInfo
}

func (l *syncLog) add(si SyncInfo) {
	l.mu.Lock()
	l.syncs = append(l.syncs, si)
	l.mu.Unlock()
}

func (l *syncLog) get() []SyncInfo {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]SyncInfo(nil), l.syncs...)
}

// waitIdle waits until no commit is in progress: the writer releases
// commitMu a little after it called the last done.
func waitIdle(t *testing.T, w *WAL) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !w.commitMu.TryLock() {
		if time.Now().After(deadline) {
			t.Fatal("the writer still commits after 10s")
		}
		time.Sleep(100 * time.Microsecond)
	}
	w.commitMu.Unlock()
}

// TestTryCommitWritesOnTheCaller commits a lone append to an idle log on
// the caller, and finds it in the log after a restart.
func TestTryCommitWritesOnTheCaller(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	var log syncLog
	w, _, err := Open(Options{Dir: dir, Source: src, InlineIdle: time.Millisecond, OnSync: log.add})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { w.Close() }()
	// The first append starts a segment, which only the writer does.
	submitSync(t, w, Append{Group: 7, Entries: []*raftpb.Entry{ent(1, 1, "first")}})
	waitIdle(t, w)
	time.Sleep(2 * time.Millisecond)
	wrote, err := w.TryCommit(Append{Group: 7, Entries: []*raftpb.Entry{ent(2, 1, "lone")}, HardState: hs(1, 0, 0)})
	if !wrote || err != nil {
		t.Fatalf("TryCommit on an idle log: wrote %v, err %v", wrote, err)
	}
	if s := log.get(); len(s) != 2 || s[0].Inline || !s[1].Inline || s[1].Entries != 1 {
		t.Fatalf("syncs %+v: want one by the writer, then one inline commit of one entry", s)
	}
	w.Close()
	w, logs := openWAL(t, dir, src)
	checkEntries(t, logs[7], []*raftpb.Entry{ent(1, 1, "first"), ent(2, 1, "lone")})
}

// TestTryCommitLeavesABusyLogToTheWriter checks every condition under which
// TryCommit must write nothing: a commit in progress, an append queued
// (written first, in order), a commit within InlineIdle, an append too
// large, a closed log.
func TestTryCommitLeavesABusyLogToTheWriter(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	release := make(chan struct{})
	var first atomic.Bool
	first.Store(true)
	var log syncLog
	w, _, err := Open(Options{Dir: dir, Source: src, InlineIdle: 50 * time.Millisecond, OnSync: func(si SyncInfo) {
		log.add(si)
		if first.Swap(false) {
			<-release
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { w.Close() }()
	lone := Append{Group: 2, Entries: []*raftpb.Entry{ent(1, 1, "b")}}
	w.Submit(Append{Group: 1, Entries: []*raftpb.Entry{ent(1, 1, "a")}}, func(error) {})
	for len(log.get()) == 0 {
		time.Sleep(time.Millisecond) // the writer is in its commit, held by OnSync
	}
	if wrote, _ := w.TryCommit(lone); wrote {
		t.Fatal("TryCommit wrote while the writer was committing")
	}
	close(release)
	time.Sleep(60 * time.Millisecond)

	// Queued but not yet taken by the writer (not woken): it goes first.
	queued := make(chan error, 1)
	w.mu.Lock()
	w.mu.queue = append(w.mu.queue, request{a: Append{Group: 3, Entries: []*raftpb.Entry{ent(1, 1, "c")}}, done: func(err error) { queued <- err }})
	w.mu.Unlock()
	if wrote, _ := w.TryCommit(lone); wrote {
		t.Fatal("TryCommit wrote ahead of a queued append")
	}
	w.kick()
	if err := <-queued; err != nil {
		t.Fatal(err)
	}
	waitIdle(t, w)
	if wrote, _ := w.TryCommit(lone); wrote {
		t.Fatal("TryCommit wrote within InlineIdle of the last commit")
	}
	time.Sleep(60 * time.Millisecond)
	big := Append{Group: 2, Entries: []*raftpb.Entry{ent(1, 1, string(make([]byte, inlineMaxBytes)))}}
	if wrote, _ := w.TryCommit(big); wrote {
		t.Fatal("TryCommit wrote an append larger than inlineMaxBytes")
	}
	if wrote, err := w.TryCommit(lone); !wrote || err != nil {
		t.Fatalf("TryCommit on an idle log: wrote %v, err %v", wrote, err)
	}
	w.Close()
	if wrote, _ := w.TryCommit(lone); wrote {
		t.Fatal("TryCommit wrote to a closed log")
	}
	syncs := log.get()
	for i, si := range syncs {
		if si.Inline != (i == len(syncs)-1) {
			t.Fatalf("syncs %+v: want only the last inline", syncs)
		}
	}
}

// TestTryCommitStartsNoSegment commits on the caller into small segments
// across several segment boundaries: an append that does not fit the
// current segment is left to the writer, which starts the next one, and
// every append is in the log after a restart.
func TestTryCommitStartsNoSegment(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 64 << 10}
	w, _, err := Open(Options{Dir: dir, Source: src, InlineIdle: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { w.Close() }()
	var want []*raftpb.Entry
	inline, left := 0, 0
	submitSync(t, w, Append{Group: 2, Entries: []*raftpb.Entry{ent(1, 1, "start")}})
	start := w.Stats().Segments
	for i := uint64(1); w.Stats().Segments < start+2; i++ {
		if i > 1000 {
			t.Fatalf("no two new segments after %d appends", i)
		}
		e := ent(i, 1, fmt.Sprintf("%d/%s", i, bytes.Repeat([]byte("z"), 5000)))
		want = append(want, e)
		a := Append{Group: 1, Entries: []*raftpb.Entry{e}}
		waitIdle(t, w)
		before := w.Stats().Segments
		wrote, err := w.TryCommit(a)
		if err != nil {
			t.Fatal(err)
		}
		if !wrote {
			left++
			submitSync(t, w, a)
			continue
		}
		inline++
		if after := w.Stats().Segments; after != before {
			t.Fatalf("append %d written on the caller went from %d to %d segments", i, before, after)
		}
	}
	if inline == 0 || left < 2 {
		t.Fatalf("%d appends written on the caller, %d left to the writer: want both", inline, left)
	}
	w.Close()
	w, logs := openWAL(t, dir, src)
	checkEntries(t, logs[1], want)
}

// TestTryCommitPanicEndsTheProcess checks that a commit that panics on the
// caller ends the process, as it does on the writer goroutine, even when
// the caller recovers panics (as a Raft round does): the log must not be
// left locked. The panic happens in a child process.
func TestTryCommitPanicEndsTheProcess(t *testing.T) {
	if dir := os.Getenv("CAIRN_WAL_PANIC_CHILD"); dir != "" {
		// The parent's directory: a child that ends in a panic removes
		// nothing it made.
		w, _, err := Open(Options{Dir: dir, Source: &zeroSource{size: 1 << 20}, InlineIdle: time.Nanosecond, OnSync: func(si SyncInfo) {
			if si.Inline {
				panic("boom")
			}
		}})
		if err != nil {
			t.Fatal(err)
		}
		submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{ent(1, 1, "a")}})
		waitIdle(t, w)
		func() {
			defer func() { _ = recover() }() // what a Raft round does
			_, _ = w.TryCommit(Append{Group: 1, Entries: []*raftpb.Entry{ent(2, 1, "b")}})
		}()
		time.Sleep(5 * time.Second)
		fmt.Println("still running")
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestTryCommitPanicEndsTheProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), "CAIRN_WAL_PANIC_CHILD="+t.TempDir())
	out, err := cmd.CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte("wal: commit panicked: boom")) || bytes.Contains(out, []byte("still running")) {
		t.Fatalf("child: err %v, output:\n%s", err, out)
	}
}

// TestTryCommitCrashKeepsAcknowledged crashes the disk (unsynced writes
// lost) under appends committed with TryCommit (or, when it declines,
// Submit) from several goroutines,
// on segments small enough that the log moves to new ones all the while:
// every acknowledged append is recovered, whoever wrote it.
func TestTryCommitCrashKeepsAcknowledged(t *testing.T) {
	disk := faultfs.MountForTest(t, faultfs.Options{})
	dir := disk.Path("wal")
	src := &zeroSource{size: 64 << 10}
	var log syncLog
	w, _, err := Open(Options{Dir: dir, Source: src, InlineIdle: time.Nanosecond, OnSync: log.add})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := disk.CrashAtSync(`\.wal$`, 120, faultfs.CrashOptions{Keep: 0.5, Seed: 3}); err != nil {
		t.Fatal(err)
	}
	const groups = 3
	var mu sync.Mutex
	acked := map[uint64]uint64{}
	var wg sync.WaitGroup
	for g := uint64(1); g <= groups; g++ {
		wg.Add(1)
		go func(g uint64) {
			defer wg.Done()
			for i := uint64(1); i < 2000; i++ {
				data := fmt.Sprintf("%d/%d/%s", g, i, bytes.Repeat([]byte("y"), 900))
				a := Append{Group: g, Entries: []*raftpb.Entry{ent(i, 1, data)}}
				wrote, err := w.TryCommit(a)
				if !wrote {
					ch := make(chan error, 1)
					w.Submit(a, func(err error) { ch <- err })
					err = <-ch
				}
				if err != nil {
					return
				}
				mu.Lock()
				acked[g] = i
				mu.Unlock()
			}
		}(g)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err = disk.WaitCrash(ctx)
	cancel()
	if err != nil {
		t.Fatalf("the cut at a sync did not happen: %v", err)
	}
	wg.Wait()
	w.Close()
	inline, writer := 0, 0
	for _, si := range log.get() {
		if si.Inline {
			inline++
		} else {
			writer++
		}
	}
	if inline == 0 || writer == 0 {
		t.Fatalf("%d inline commits and %d by the writer: want both", inline, writer)
	}
	disk.Restart()

	w, logs := openWAL(t, dir, src)
	defer w.Close()
	for g := uint64(1); g <= groups; g++ {
		if acked[g] == 0 {
			continue
		}
		gl := logs[g]
		if gl == nil {
			t.Fatalf("group %d lost: %d were acknowledged", g, acked[g])
		}
		if n := uint64(len(gl.Entries)); n < acked[g] {
			t.Fatalf("group %d: recovered %d entries, %d were acknowledged", g, n, acked[g])
		}
		for i, e := range gl.Entries {
			if e.GetIndex() != uint64(i)+1 || !bytes.HasPrefix(e.GetData(), fmt.Appendf(nil, "%d/%d/", g, i+1)) {
				t.Fatalf("group %d entry %d is wrong: index %d data %.20q", g, i, e.GetIndex(), e.GetData())
			}
		}
	}
}
