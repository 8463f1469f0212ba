package faultfs

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/copyset/wal"
	"cairn.io/cairn/internal/soon"
)

// These tests run Cairn's real storage, the chunk file pool and the shared
// write-ahead log on it, inside a faultfs mount.

var quiet = slog.New(slog.DiscardHandler)

func openPool(t *testing.T, f *FS) *chunkfilepool.Pool {
	t.Helper()
	p, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir: f.Path("pool"), ChunkSize: 256 << 10, MetaPageSize: 4096, BlockSize: 4096,
		InitialChunks: 4, MaxChunks: 64, Logger: quiet,
	})
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	return p
}

func openWAL(t *testing.T, f *FS, p *chunkfilepool.Pool) (*wal.WAL, map[uint64]*wal.GroupLog) {
	t.Helper()
	w, logs, err := wal.Open(wal.Options{Dir: f.Path("wal"), Source: p, Logger: quiet})
	if err != nil {
		t.Fatalf("open wal: %v", err)
	}
	return w, logs
}

func entry(group, index uint64) *raftpb.Entry {
	term := uint64(1)
	typ := raftpb.EntryNormal
	data := fmt.Appendf(nil, "%d/%d/%s", group, index, bytes.Repeat([]byte{byte(index)}, 200+int(index%300)))
	return &raftpb.Entry{Index: &index, Term: &term, Type: &typ, Data: data}
}

// checkLog checks that group's recovered log is entries 1..n with n at
// least acked, and returns n.
func checkLog(t *testing.T, logs map[uint64]*wal.GroupLog, group, acked uint64) uint64 {
	t.Helper()
	gl := logs[group]
	if gl == nil {
		if acked == 0 {
			return 0
		}
		t.Fatalf("group %d lost; %d entries were acknowledged", group, acked)
	}
	n := uint64(len(gl.Entries))
	if n < acked {
		t.Fatalf("group %d: recovered %d entries, %d were acknowledged", group, n, acked)
	}
	for i, e := range gl.Entries {
		want := entry(group, uint64(i)+1)
		if e.GetIndex() != want.GetIndex() || !bytes.Equal(e.GetData(), want.GetData()) {
			t.Fatalf("group %d: entry %d is wrong (index %d)", group, i, e.GetIndex())
		}
	}
	return n
}

// TestWALOnPoolSurvivesCrashes runs the WAL with concurrent submitters on a
// chunk file pool in the mount and cuts the power at the WAL's nth
// fdatasync, between a group commit's write and its sync; then it reopens
// both. The recovered log of every group is exactly what was acknowledged:
// nothing acknowledged is lost, and the batch whose sync never happened is
// gone. Each round cuts at another sync, and the WAL then continues on the
// recovered log.
func TestWALOnPoolSurvivesCrashes(t *testing.T) {
	f := MountForTest(t, Options{})
	const groups = 3
	p := openPool(t, f)
	w, logs := openWAL(t, f, p)
	acked := map[uint64]uint64{} // per group: the log holds entries 1..acked[g]
	for g := uint64(1); g <= groups; g++ {
		acked[g] = checkLog(t, logs, g, 0)
	}
	for round, n := range []int{1, 7, 40, 3, 90} {
		if _, err := f.CrashAtSync("^wal/", n, CrashOptions{}); err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for g := uint64(1); g <= groups; g++ {
			mu.Lock() // the writers of the groups started before update acked
			first := acked[g] + 1
			mu.Unlock()
			wg.Add(1)
			go func(first uint64) {
				defer wg.Done()
				for i := first; ; i++ {
					ch := make(chan error, 1)
					w.Submit(wal.Append{Group: g, Entries: []*raftpb.Entry{entry(g, i)}}, func(err error) { ch <- err })
					if err := <-ch; err != nil {
						return // the power is cut: the WAL fails from now on
					}
					mu.Lock()
					acked[g] = i
					mu.Unlock()
				}
			}(first)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		rep, err := f.WaitCrash(ctx)
		cancel()
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if rep.PagesLost == 0 {
			t.Fatalf("round %d: the cut at a WAL sync lost no page: %+v", round, rep)
		}
		wg.Wait()
		_ = w.Close()
		_ = p.Close()
		f.Restart()

		p = openPool(t, f)
		w, logs = openWAL(t, f, p)
		for g := uint64(1); g <= groups; g++ {
			if n := checkLog(t, logs, g, acked[g]); n != acked[g] {
				t.Fatalf("round %d: group %d recovered %d entries, only %d were acknowledged: unsynced data survived", round, g, n, acked[g])
			}
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	waitLeakedClosed(t, f)
}

// waitLeakedClosed waits until the process has no file in the mount open.
// wal.WAL.Close does not close the segment files of a WAL that stopped
// itself after a write or sync error (here: EIO); they stay open until the
// garbage collector finalizes them, and the mount cannot be unmounted
// before. Call it once the failed WAL is unreachable.
func waitLeakedClosed(t *testing.T, f *FS) {
	t.Helper()
	soon.True(t, 20*time.Second, "leaked WAL segment files to be finalized", func() bool {
		runtime.GC()
		return len(openUnder(t, f.Path())) == 0
	})
}

// openUnder lists the files under dir that this process has open.
func openUnder(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var open []string
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, dir+"/") {
			open = append(open, l)
		}
	}
	return open
}

// TestWALFailedSyncLosesUnacknowledgedAppend: when the WAL's fdatasync
// fails, the append is not acknowledged, the WAL stops, and the append is
// not in the log when it is reopened: the failed sync lost it, as a disk
// would.
func TestWALFailedSyncLosesUnacknowledgedAppend(t *testing.T) {
	f := MountForTest(t, Options{})
	p := openPool(t, f)
	w, _ := openWAL(t, f, p)
	submit := func(i uint64) error {
		ch := make(chan error, 1)
		w.Submit(wal.Append{Group: 1, Entries: []*raftpb.Entry{entry(1, i)}}, func(err error) { ch <- err })
		return <-ch
	}
	for i := uint64(1); i <= 20; i++ {
		if err := submit(i); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.FailSync("^wal/", 1); err != nil {
		t.Fatal(err)
	}
	if err := submit(21); err == nil {
		t.Fatal("append acknowledged although its fdatasync failed")
	}
	if err := submit(22); err == nil {
		t.Fatal("the WAL took an append after a failed sync")
	}
	if st := f.Stats(); st.SyncFaults != 1 || st.PagesLostToSyncs == 0 {
		t.Fatalf("stats %+v: the sync fault did not fire or lost nothing", st)
	}
	_ = w.Close()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p = openPool(t, f)
	w, logs := openWAL(t, f, p)
	if n := checkLog(t, logs, 1, 20); n != 20 {
		t.Fatalf("recovered %d entries: the append whose sync failed came back", n)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	waitLeakedClosed(t, f)
}

// TestPoolChunkFileLosesUnsyncedWrites: a chunk file handed out by the pool
// keeps, after a crash, the blocks that were fdatasynced and the formatted
// zeros where writes were not synced.
func TestPoolChunkFileLosesUnsyncedWrites(t *testing.T) {
	f := MountForTest(t, Options{})
	p := openPool(t, f)
	if err := os.Mkdir(f.Path("chunks"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := fsutil.SyncDir(f.Path()); err != nil {
		t.Fatal(err)
	}
	if err := p.Get(f.Path("chunks", "1")); err != nil {
		t.Fatal(err)
	}
	fd := openRW(t, f, "chunks/1")
	synced, unsynced := randBytes(90, 8192), randBytes(91, 8192)
	writeAt(t, fd, synced, 4096)
	if err := unix.Fdatasync(int(fd.Fd())); err != nil {
		t.Fatal(err)
	}
	writeAt(t, fd, unsynced, 64<<10)
	writeAt(t, fd, unsynced[:100], 4096+8000) // straddles the synced block's end
	if _, err := f.Crash(CrashOptions{}); err != nil {
		t.Fatal(err)
	}
	_ = p.Close()
	f.Restart()

	want := make([]byte, p.FileSize())
	copy(want[4096:], synced)
	checkContent(t, f, "chunks/1", want)
	p = openPool(t, f)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}
