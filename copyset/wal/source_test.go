package wal

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/chunkfilepool"
)

// failingSource is zeroSource whose Get fails with err while err is set.
type failingSource struct {
	zeroSource
	mu    sync.Mutex
	err   error
	calls int
}

func (f *failingSource) Get(dst string) error {
	f.mu.Lock()
	err := f.err
	f.calls++
	f.mu.Unlock()
	if err != nil {
		return err
	}
	return f.zeroSource.Get(dst)
}

func (f *failingSource) set(err error) {
	f.mu.Lock()
	f.err = err
	f.mu.Unlock()
}

// logOnFailingSource opens a log on a failingSource, appends until the log
// took its first segment and its spare from the source (the segment after
// them comes from the source when asked), then makes the source fail with
// err. It returns the log (closed when the test ends), the source and the
// last entry index appended.
func logOnFailingSource(t *testing.T, err error) (*WAL, *failingSource, uint64) {
	t.Helper()
	src := &failingSource{zeroSource: zeroSource{size: 64 << 10}}
	w, _ := openWAL(t, t.TempDir(), src)
	t.Cleanup(func() { w.Close() })
	idx := uint64(0)
	for got, _ := src.counts(); got < 2; got, _ = src.counts() {
		idx++
		submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{ent(idx, 1, string(make([]byte, 4000)))}})
	}
	src.set(err)
	return w, src, idx
}

// TestAnEmptySourceHoldsAppendsUntilItHasASegment: a source with no file
// to give (the pool is full) holds appends back, without failing the log,
// until it has one.
func TestAnEmptySourceHoldsAppendsUntilItHasASegment(t *testing.T) {
	w, src, idx := logOnFailingSource(t, fmt.Errorf("get chunk file: %w: formatting", chunkfilepool.ErrPoolEmpty))
	const n = 60 // more than the current segment and the spare hold
	done := make(chan error, n)
	for i := 0; i < n; i++ {
		idx++
		w.Submit(Append{Group: 1, Entries: []*raftpb.Entry{ent(idx, 1, string(make([]byte, 4000)))}}, func(err error) { done <- err })
	}
	completed := 0
	for waiting := true; waiting; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("append while the source had no segment: %v; want it held back", err)
			}
			completed++
		case <-time.After(300 * time.Millisecond):
			waiting = false
		}
	}
	if completed == n {
		t.Fatalf("all %d appends completed while the source had no segment: the test needs more", n)
	}
	src.set(nil)
	for ; completed < n; completed++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("append after the source has a segment again: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("appends still held back after the source has a segment again")
		}
	}
}

// TestAFailingSourceFailsTheLog: any other error of the source (a failing
// disk) fails the log at once instead of holding every append back.
func TestAFailingSourceFailsTheLog(t *testing.T) {
	w, _, idx := logOnFailingSource(t, fmt.Errorf("rename into the WAL directory: %w", syscall.EIO))
	var err error
	for i := 0; i < 40 && err == nil; i++ {
		idx++
		done := make(chan error, 1)
		w.Submit(Append{Group: 1, Entries: []*raftpb.Entry{ent(idx, 1, string(make([]byte, 4000)))}}, func(err error) { done <- err })
		select {
		case err = <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("an append waits on a failing source")
		}
	}
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("appends past the segment end: %v, want the source's EIO", err)
	}
}
