package wal

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/test/faultfs"
)

// requireDirectIO skips the test unless dir's filesystem takes O_DIRECT
// writes around its page cache (tmpfs accepts O_DIRECT but has nothing but
// the page cache).
func requireDirectIO(t *testing.T, dir string) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skipf("%s is on tmpfs: no page cache to go around", dir)
	}
	probe := filepath.Join(dir, "probe")
	fd, err := unix.Open(probe, unix.O_CREAT|unix.O_WRONLY|unix.O_DIRECT, 0o600)
	if err != nil {
		t.Skipf("no O_DIRECT on %s: %v", dir, err)
	}
	unix.Close(fd)
	os.Remove(probe)
}

// TestGroupCommitsBypassThePageCache: where the filesystem takes O_DIRECT
// writes, what the log writes does not stay in the page cache (recovery
// alone reads it back), also after a restart in the middle of a page, and
// everything recovers exactly.
func TestGroupCommitsBypassThePageCache(t *testing.T) {
	dir := t.TempDir()
	requireDirectIO(t, dir)
	src := &zeroSource{size: 1 << 20}
	var want []*raftpb.Entry
	for round := 0; round < 2; round++ {
		w, logs := openWAL(t, dir, src)
		if round > 0 {
			checkEntries(t, logs[3], want)
		}
		w.mu.Lock()
		from := int64(0)
		if n := len(w.mu.segs); n > 0 {
			from = w.mu.segs[n-1].writeOff &^ (pageSize - 1)
		}
		w.mu.Unlock()
		for i := 1; i <= 20; i++ {
			idx := uint64(len(want) + 1)
			e := ent(idx, 1, string(bytes.Repeat([]byte{byte(idx)}, 3000+i*101)))
			want = append(want, e)
			submitSync(t, w, Append{Group: 3, Entries: []*raftpb.Entry{e}, HardState: hs(1, 1, idx)})
		}
		w.mu.Lock()
		seg := w.mu.segs[len(w.mu.segs)-1]
		path, end := seg.path, seg.writeOff
		w.mu.Unlock()
		// The test source wrote its zeros through the page cache, and
		// recovery read the segment through it; the log's writes must
		// have taken the pages they wrote out of it.
		if cached := cachedPages(t, path, from, end&^(pageSize-1)); cached != 0 {
			t.Fatalf("round %d: %d of the pages the log wrote from offset %d to %d are in the page cache", round, cached, from, end)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[3], want)
}

// cachedPages counts the pages of [from, to) of a file that are in the page
// cache.
func cachedPages(t *testing.T, path string, from, to int64) int {
	t.Helper()
	if to <= from {
		t.Fatalf("no whole page written between %d and %d", from, to)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), from, int(to-from), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	vec := make([]byte, (to-from)/pageSize)
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatal(errno)
	}
	n := 0
	for _, v := range vec {
		n += int(v & 1)
	}
	return n
}

// TestBuffersGrownForLargeBatchesStayPageAligned: a group commit larger
// than the writer's buffer grows it; the buffer kept for the next one is
// page aligned, so later writes still go around the page cache.
func TestBuffersGrownForLargeBatchesStayPageAligned(t *testing.T) {
	dir := t.TempDir()
	requireDirectIO(t, dir)
	src := &zeroSource{size: 16 << 20}
	w, _ := openWAL(t, dir, src)
	want := []*raftpb.Entry{ent(1, 1, "x")}
	submitSync(t, w, Append{Group: 1, Entries: want})
	var ents []*raftpb.Entry
	for i := uint64(2); i < 2+700; i++ {
		ents = append(ents, ent(i, 1, string(bytes.Repeat([]byte{byte(i)}, 3001))))
	}
	want = append(want, ents...)
	submitSync(t, w, Append{Group: 1, Entries: ents})
	if c := cap(w.buf); c <= 1<<20 {
		t.Fatalf("the buffer did not grow (capacity %d): the test needs a larger batch", c)
	}
	if !fsutil.Aligned(w.buf) {
		t.Fatalf("the grown buffer is not page aligned")
	}
	want = append(want, ent(702, 1, "after"))
	submitSync(t, w, Append{Group: 1, Entries: want[len(want)-1:]})
	w.mu.Lock()
	seg := w.mu.segs[len(w.mu.segs)-1]
	path, end := seg.path, seg.writeOff
	w.mu.Unlock()
	if c := cachedPages(t, path, 0, end&^(pageSize-1)); c != 0 {
		t.Fatalf("%d pages the log wrote are in the page cache", c)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[1], want)
}

// TestWritesOfUnknownPageStartsMixWithDirectOnes: when the start of the
// page the log ends in is not known, the next write goes through the page
// cache from the write offset; buffered and direct writes of the same pages
// stay coherent and everything recovers exactly.
func TestWritesOfUnknownPageStartsMixWithDirectOnes(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	w, _ := openWAL(t, dir, src)
	var want []*raftpb.Entry
	add := func(n int) {
		idx := uint64(len(want) + 1)
		e := ent(idx, 1, string(bytes.Repeat([]byte{byte(idx)}, n)))
		want = append(want, e)
		submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{e}})
	}
	add(1000)
	for i := 0; i < 30; i++ {
		if i%3 == 0 {
			w.mu.Lock()
			w.mu.segs[len(w.mu.segs)-1].tail = nil // forget the page start
			w.mu.Unlock()
		}
		add(100 + i*300)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, logs := openWAL(t, dir, src)
	checkEntries(t, logs[1], want)
	add(50)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, logs = openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[1], want)
}

// TestCrashesAfterRecoveriesKeepEveryAcknowledgedEntry: power cuts (with
// none, half or nearly all of the unsynced writes kept) between rounds of
// appends, each round starting in the page recovery left the log in;
// every acknowledged entry comes back exactly.
func TestCrashesAfterRecoveriesKeepEveryAcknowledgedEntry(t *testing.T) {
	for _, keep := range []float64{0, 0.5, 0.99} {
		t.Run(fmt.Sprint("keep ", keep), func(t *testing.T) {
			disk := faultfs.MountForTest(t, faultfs.Options{})
			dir := disk.Path("wal")
			src := &renamingSource{zeroSource{size: 64 << 10}}
			var want []*raftpb.Entry
			for round := 0; round < 6; round++ {
				w, logs := openWAL(t, dir, src)
				if round > 0 {
					gl := logs[1]
					if gl == nil || len(gl.Entries) < len(want) {
						t.Fatalf("round %d: acknowledged entries lost", round)
					}
					checkEntries(t, &GroupLog{Entries: gl.Entries[:len(want)]}, want)
					want = gl.Entries // an unacknowledged one may have survived
				}
				for i := 0; i < 25; i++ {
					idx := uint64(len(want) + 1)
					e := ent(idx, 1, string(bytes.Repeat([]byte{byte(idx)}, 200+int(idx)*53%3000)))
					submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{e}})
					want = append(want, e)
				}
				// One unacknowledged batch in flight at the cut.
				idx := uint64(len(want) + 1)
				w.Submit(Append{Group: 1, Entries: []*raftpb.Entry{ent(idx, 1, string(bytes.Repeat([]byte("u"), 5000)))}}, func(error) {})
				if _, err := disk.Crash(faultfs.CrashOptions{Keep: keep, Seed: uint64(round + 7)}); err != nil {
					t.Fatal(err)
				}
				w.Close()
				disk.Restart()
			}
			w, logs := openWAL(t, dir, src)
			defer w.Close()
			gl := logs[1]
			if gl == nil || len(gl.Entries) < len(want) {
				t.Fatalf("acknowledged entries lost")
			}
			checkEntries(t, &GroupLog{Entries: gl.Entries[:len(want)]}, want)
		})
	}
}

// renamingSource hands out only complete files, as the pool does (a rename
// of a synced file), so that a crash never leaves a short segment.
type renamingSource struct{ zeroSource }

func (r *renamingSource) Get(dst string) error {
	tmp := dst + ".tmp"
	_ = os.Remove(tmp)
	if err := r.zeroSource.Get(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dst); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(dst))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
