package faultfs

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkserver/datastore"
)

// randBytes returns n bytes drawn from seed.
func randBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// createSynced creates name in the mount with content data, fsynced.
func createSynced(t *testing.T, f *FS, name string, data []byte) {
	t.Helper()
	fd, err := os.OpenFile(f.Path(name), os.O_CREATE|os.O_RDWR|os.O_EXCL, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	if _, err := fd.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := fd.Sync(); err != nil {
		t.Fatal(err)
	}
}

// openRW opens name in the mount for reading and writing; it is closed when
// the test ends (errors ignored: a crash kills it).
func openRW(t *testing.T, f *FS, name string) *os.File {
	t.Helper()
	fd, err := os.OpenFile(f.Path(name), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fd.Close() })
	return fd
}

func writeAt(t *testing.T, fd *os.File, data []byte, off int64) {
	t.Helper()
	if n, err := fd.WriteAt(data, off); err != nil || n != len(data) {
		t.Fatalf("write %d bytes at %d: %d, %v", len(data), off, n, err)
	}
}

// crash cuts the power and restarts, failing the test on an error.
func crash(t *testing.T, f *FS, opts CrashOptions) CrashReport {
	t.Helper()
	rep, err := f.Crash(opts)
	if err != nil {
		t.Fatalf("crash: %v", err)
	}
	f.Restart()
	return rep
}

// checkContent compares name's content, read both through the mount and
// from the backing directory, with want.
func checkContent(t *testing.T, f *FS, name string, want []byte) {
	t.Helper()
	for _, p := range []string{f.Path(name), f.BackingPath(name)} {
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes, want %d; first difference at %d", p, len(got), len(want), firstDiff(got, want))
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

func isErrno(err error, errno syscall.Errno) bool { return errors.Is(err, errno) }

// storeOp is an operation a datastore crash test logs and replays.
type storeOp interface {
	apply(s *datastore.Store) error
}

// powerCut ends a round of a datastore crash test: it waits for the crash
// an operation ran into (opErr), or, when none failed, removes the armed
// rule and cuts the power now (keeping that share of unsynced pages). It
// reports whether the cut fell at the armed sync.
func powerCut(t *testing.T, f *FS, round int, opErr error, armed RuleID, keep float64) bool {
	t.Helper()
	if opErr != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := f.WaitCrash(ctx)
		cancel()
		if err != nil {
			t.Fatalf("round %d: an operation failed (%v) but no crash happened: %v", round, opErr, err)
		}
		return true
	}
	if armed != 0 {
		f.RemoveRule(armed)
	}
	if _, err := f.Crash(CrashOptions{Keep: keep, Seed: uint64(round)}); err != nil {
		t.Fatal(err)
	}
	return false
}

// replay applies the operations logged since the last checkpoint, as a
// copyset does after a crash.
func replay[O storeOp](t *testing.T, s *datastore.Store, round int, log []O) {
	t.Helper()
	for i, o := range log {
		if err := o.apply(s); err != nil {
			t.Fatalf("round %d: replay operation %d of %d: %v", round, i, len(log), err)
		}
	}
}

// testStore opens a datastore of 64 KiB chunks and its pool in the mount
// (again after each restart), the pool starting with initial files and
// growing up to most.
type testStore struct {
	t             *testing.T
	f             *FS
	initial, most int
}

func (o testStore) open() (*chunkfilepool.Pool, *datastore.Store) {
	o.t.Helper()
	p, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir: o.f.Path("pool"), ChunkSize: 64 << 10, MetaPageSize: 4096, BlockSize: 512,
		InitialChunks: o.initial, MaxChunks: o.most, Logger: quiet,
	})
	if err != nil {
		o.t.Fatalf("open pool: %v", err)
	}
	s, err := datastore.Open(o.f.Path("store"), p, datastore.Options{Logger: quiet, CreateWait: time.Minute})
	if err != nil {
		o.t.Fatalf("open store: %v", err)
	}
	return p, s
}

// restart drops a store and its pool after a power cut, restarts the
// mount and opens both again.
func (o testStore) restart(s *datastore.Store, p *chunkfilepool.Pool) (*chunkfilepool.Pool, *datastore.Store) {
	_ = s.Close()
	_ = p.Close()
	o.f.Restart()
	return o.open()
}

// closeStore closes a store and its pool at the end of a test.
func closeStore(t *testing.T, s *datastore.Store, p *chunkfilepool.Pool) {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}
