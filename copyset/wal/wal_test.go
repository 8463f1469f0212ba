package wal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/faultfs"
)

// zeroSource is a test stand-in for the chunk file pool: it creates
// zero-filled files of a fixed size and deletes recycled ones.
type zeroSource struct {
	size     int64
	mu       sync.Mutex
	got      int
	recycled int
}

func (z *zeroSource) Get(dst string) error {
	if _, err := os.Stat(dst); err == nil {
		return fmt.Errorf("get %s: %w", dst, os.ErrExist)
	}
	f, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(make([]byte, z.size)); err != nil {
		return err
	}
	z.mu.Lock()
	z.got++
	z.mu.Unlock()
	return f.Sync()
}

func (z *zeroSource) Recycle(path string) error {
	z.mu.Lock()
	z.recycled++
	z.mu.Unlock()
	return os.Remove(path)
}

func (z *zeroSource) FileSize() int64 { return z.size }

func (z *zeroSource) counts() (got, recycled int) {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.got, z.recycled
}

func ent(index, term uint64, data string) *raftpb.Entry {
	typ := raftpb.EntryNormal
	return &raftpb.Entry{Index: &index, Term: &term, Type: &typ, Data: []byte(data)}
}

func hs(term, vote, commit uint64) *raftpb.HardState {
	return &raftpb.HardState{Term: &term, Vote: &vote, Commit: &commit}
}

func openWAL(t *testing.T, dir string, src SegmentSource) (*WAL, map[uint64]*GroupLog) {
	t.Helper()
	w, logs, err := Open(Options{Dir: dir, Source: src})
	if err != nil {
		t.Fatalf("open wal: %v", err)
	}
	return w, logs
}

// submitSync submits and waits for durability.
func submitSync(t *testing.T, w *WAL, a Append) {
	t.Helper()
	ch := make(chan error, 1)
	w.Submit(a, func(err error) { ch <- err })
	if err := <-ch; err != nil {
		t.Fatalf("submit group %d: %v", a.Group, err)
	}
}

func checkEntries(t *testing.T, gl *GroupLog, want []*raftpb.Entry) {
	t.Helper()
	if gl == nil {
		t.Fatalf("group missing from recovery")
	}
	if len(gl.Entries) != len(want) {
		t.Fatalf("recovered %d entries, want %d", len(gl.Entries), len(want))
	}
	for i := range want {
		g, w := gl.Entries[i], want[i]
		if g.GetIndex() != w.GetIndex() || g.GetTerm() != w.GetTerm() || !bytes.Equal(g.GetData(), w.GetData()) {
			t.Fatalf("entry %d: got (%d,%d,%q) want (%d,%d,%q)", i, g.GetIndex(), g.GetTerm(), g.GetData(), w.GetIndex(), w.GetTerm(), w.GetData())
		}
	}
}

func TestRecoverEntriesAndHardStates(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	w, logs := openWAL(t, dir, src)
	if len(logs) != 0 {
		t.Fatalf("new wal recovered %d groups", len(logs))
	}
	want := map[uint64][]*raftpb.Entry{}
	for g := uint64(1); g <= 5; g++ {
		for i := uint64(1); i <= 20; i++ {
			e := ent(i, 1, fmt.Sprintf("g%d-e%d", g, i))
			want[g] = append(want[g], e)
			submitSync(t, w, Append{Group: g, Entries: []*raftpb.Entry{e}, HardState: hs(1, g, i)})
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w, logs = openWAL(t, dir, src)
	defer w.Close()
	for g := uint64(1); g <= 5; g++ {
		checkEntries(t, logs[g], want[g])
		if h := logs[g].HardState; h.GetTerm() != 1 || h.GetVote() != g || h.GetCommit() != 20 {
			t.Fatalf("group %d hard state %v", g, h)
		}
	}
}

func TestTruncationAndSnapshotMark(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	w, _ := openWAL(t, dir, src)
	var ents []*raftpb.Entry
	for i := uint64(1); i <= 10; i++ {
		ents = append(ents, ent(i, 1, "old"))
	}
	submitSync(t, w, Append{Group: 7, Entries: ents})
	// A new leader overwrites 5..7; 8..10 are gone.
	submitSync(t, w, Append{Group: 7, Entries: []*raftpb.Entry{ent(5, 2, "a"), ent(6, 2, "b"), ent(7, 2, "c")}})
	// Group 8 gets a snapshot that discards its log.
	submitSync(t, w, Append{Group: 8, Entries: []*raftpb.Entry{ent(1, 1, "x"), ent(2, 1, "y")}})
	cs := &raftpb.ConfState{Voters: []uint64{1, 2, 3}}
	submitSync(t, w, Append{Group: 8, Snapshot: &SnapshotMark{Index: 20, Term: 3, ConfState: cs}, Entries: []*raftpb.Entry{ent(21, 3, "z")}})
	w.Close()

	w, logs := openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[7], []*raftpb.Entry{ent(1, 1, "old"), ent(2, 1, "old"), ent(3, 1, "old"), ent(4, 1, "old"), ent(5, 2, "a"), ent(6, 2, "b"), ent(7, 2, "c")})
	s := logs[8].Snapshot
	if s == nil || s.Index != 20 || s.Term != 3 || len(s.ConfState.GetVoters()) != 3 {
		t.Fatalf("snapshot mark %+v", s)
	}
	checkEntries(t, logs[8], []*raftpb.Entry{ent(21, 3, "z")})
}

// TestTornTailIsCut writes garbage after the last record, as a crash in the
// middle of a write would leave, and checks that recovery stops there, that
// new appends go where the garbage was, and that nothing stale comes back.
func TestTornTailIsCut(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 256 << 10}
	w, _ := openWAL(t, dir, src)
	submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{ent(1, 1, "keep")}})
	w.Close()

	// Forge a valid-looking record after a hole: the shape a torn batch
	// leaves when a middle page never reached the disk.
	path := filepath.Join(dir, "0000000000000001.wal")
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var stale []byte
	stale = appendRecord(stale, 1, recEntries, 1, appendEntriesPayload(nil, []*raftpb.Entry{ent(3, 1, "stale")}))
	firstEnd := int64(headerBlockSize + recordHeaderSize + entriesPayloadSize([]*raftpb.Entry{ent(1, 1, "keep")}))
	newEnd := firstEnd + int64(recordHeaderSize+entriesPayloadSize([]*raftpb.Entry{ent(2, 1, "new")}))
	// Torn bytes right after the first record, and a complete record for
	// index 3 exactly where the next append will end.
	if _, err := f.WriteAt([]byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3}, firstEnd); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(stale, newEnd); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// The garbage starts right after the first record.
	w, logs := openWAL(t, dir, src)
	checkEntries(t, logs[1], []*raftpb.Entry{ent(1, 1, "keep")})
	submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{ent(2, 1, "new")}})
	w.Close()
	// The forged record further on was zeroed by the cut: it must not come
	// back after the new record.
	w, logs = openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[1], []*raftpb.Entry{ent(1, 1, "keep"), ent(2, 1, "new")})
}

// TestCrashKeepsAcknowledged runs a WAL on a disk that loses, at a power
// cut, everything not fsynced (all of it or a random part, page by page),
// with segments so small that group commits cross them, and cuts the power
// under load: either at a random moment or exactly at a random fdatasync,
// between the writes it would have made durable and the sync. Recovery
// must succeed and return every acknowledged entry, in order. A cut at a
// sync finds the writes of a batch that crosses into a new segment in the
// worst place, so this also checks that a finished segment is synced before
// the next one's header is written (else the header may survive while the
// end of the segment before it does not, which recovery rightly calls
// corrupt).
func TestCrashKeepsAcknowledged(t *testing.T) {
	for i, keep := range []float64{0, 0.3, 0.5, 0.99} {
		for _, atSync := range []bool{false, true} {
			t.Run(fmt.Sprintf("keep=%v/atSync=%v", keep, atSync), func(t *testing.T) {
				disk := faultfs.MountForTest(t, faultfs.Options{})
				dir := disk.Path("wal")
				src := &zeroSource{size: 64 << 10} // small: batches cross segments
				w, _ := openWAL(t, dir, src)
				opts := faultfs.CrashOptions{Keep: keep, Seed: uint64(i + 1)}
				if atSync {
					if _, err := disk.CrashAtSync(`\.wal$`, 40+17*i, opts); err != nil {
						t.Fatal(err)
					}
				}
				const groups = 4
				var mu sync.Mutex
				acked := map[uint64]uint64{} // group -> highest acknowledged index
				var wg sync.WaitGroup
				var stop atomic.Bool
				for g := uint64(1); g <= groups; g++ {
					wg.Add(1)
					go func(g uint64) {
						defer wg.Done()
						for i := uint64(1); !stop.Load() && i < 2000; i++ {
							ch := make(chan error, 1)
							w.Submit(Append{Group: g, Entries: []*raftpb.Entry{ent(i, 1, fmt.Sprintf("%d/%d/%s", g, i, bytes.Repeat([]byte("x"), 300)))}}, func(err error) { ch <- err })
							if err := <-ch; err != nil {
								return
							}
							mu.Lock()
							acked[g] = i
							mu.Unlock()
						}
					}(g)
				}
				if atSync {
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					_, err := disk.WaitCrash(ctx)
					cancel()
					if err != nil {
						t.Fatalf("the cut at a sync did not happen: %v", err)
					}
				} else {
					soon.True(t, 20*time.Second, "150 acknowledged appends", func() bool {
						mu.Lock()
						defer mu.Unlock()
						return acked[1] >= 150
					})
					if _, err := disk.Crash(opts); err != nil {
						t.Fatal(err)
					}
				}
				stop.Store(true)
				wg.Wait()
				w.Close()
				disk.Restart()

				w, logs := openWAL(t, dir, src)
				defer w.Close()
				for g := uint64(1); g <= groups; g++ {
					gl := logs[g]
					if acked[g] == 0 {
						continue
					}
					if gl == nil {
						t.Fatalf("group %d lost", g)
					}
					n := uint64(len(gl.Entries))
					if n < acked[g] {
						t.Fatalf("group %d: recovered %d entries, %d were acknowledged", g, n, acked[g])
					}
					for i, e := range gl.Entries {
						if e.GetIndex() != uint64(i)+1 || !bytes.HasPrefix(e.GetData(), fmt.Appendf(nil, "%d/%d/", g, i+1)) {
							t.Fatalf("group %d entry %d is wrong: index %d data %.20q", g, i, e.GetIndex(), e.GetData())
						}
					}
				}
			})
		}
	}
}

// TestRecycleKeepsUncoveredHardState fills many small segments with one busy
// group while an idle group's only hard state sits in the first segment: the
// segment stays until the idle group's checkpoint records that hard state,
// and the hard state survives a restart either way.
func TestRecycleKeepsUncoveredHardState(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 32 << 10}
	w, _ := openWAL(t, dir, src)
	submitSync(t, w, Append{Group: 99, HardState: hs(5, 3, 0)})
	payload := string(bytes.Repeat([]byte("p"), 1000))
	for i := uint64(1); i <= 200; i++ {
		submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{ent(i, 1, payload)}, HardState: hs(1, 1, i)})
	}
	if st := w.Stats(); st.Segments < 5 {
		t.Fatalf("only %d segments for 200 KiB of entries in 32 KiB segments", st.Segments)
	}
	if pg := w.PinningGroups(1); len(pg) != 2 || pg[0] != 1 || pg[1] != 99 {
		t.Fatalf("pinning groups %v, want [1 99]", pg)
	}
	w.SetCheckpoint(1, 190, hs(1, 1, 190))
	// The busy group's checkpoint alone frees nothing: the first segment
	// holds the idle group's only hard state.
	submitSync(t, w, Append{Group: 1, HardState: hs(1, 1, 200)})
	if _, rec := src.counts(); rec != 0 {
		t.Fatalf("%d segments recycled while the idle group's hard state was only in the first one", rec)
	}
	if pg := w.PinningGroups(1); len(pg) != 1 || pg[0] != 99 {
		t.Fatalf("pinning groups %v, want [99]", pg)
	}
	// A checkpoint recording an older hard state does not cover it either.
	w.SetCheckpoint(99, 0, hs(4, 3, 0))
	submitSync(t, w, Append{Group: 1, HardState: hs(1, 1, 200)})
	if _, rec := src.counts(); rec != 0 {
		t.Fatalf("recycled on a checkpoint with an older hard state")
	}
	w.SetCheckpoint(99, 0, hs(5, 3, 0))
	soon.True(t, 20*time.Second, "old segments recycled", func() bool { return w.Stats().Segments <= 2 })
	if _, rec := src.counts(); rec == 0 {
		t.Fatalf("no segment went back to the source")
	}
	w.Close()
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	if h := logs[99]; h != nil {
		t.Fatalf("idle group's hard state is still in the log after its checkpoint recorded it")
	}
	gl := logs[1]
	if last := gl.Entries[len(gl.Entries)-1].GetIndex(); last != 200 {
		t.Fatalf("busy group's last entry %d", last)
	}
	if first := gl.Entries[0].GetIndex(); first > 191 {
		t.Fatalf("entries after the checkpoint were recycled: first is %d", first)
	}
}

func TestForgottenGroupDoesNotPin(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 32 << 10}
	w, _ := openWAL(t, dir, src)
	defer w.Close()
	payload := string(bytes.Repeat([]byte("q"), 2000))
	for i := uint64(1); i <= 60; i++ {
		submitSync(t, w, Append{Group: 3, Entries: []*raftpb.Entry{ent(i, 1, payload)}, HardState: hs(1, 0, i)})
	}
	before := w.Stats().Segments
	if err := w.Forget(3); err != nil {
		t.Fatal(err)
	}
	submitSync(t, w, Append{Group: 4, Entries: []*raftpb.Entry{ent(1, 1, "x")}})
	w.SetCheckpoint(4, 1, nil)
	soon.True(t, 20*time.Second, "segments of a forgotten group recycled", func() bool { return w.Stats().Segments < before })
}

// TestGroupCommitBatches holds the first sync until every other submission
// is queued and checks that they all go out in the next single sync.
func TestGroupCommitBatches(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 4 << 20}
	release := make(chan struct{})
	var syncs []SyncInfo
	var mu sync.Mutex
	first := true
	w, _, err := Open(Options{Dir: dir, Source: src, OnSync: func(si SyncInfo) {
		mu.Lock()
		syncs = append(syncs, si)
		wait := first
		first = false
		mu.Unlock()
		if wait {
			<-release
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	const n = 100
	var wg sync.WaitGroup
	wg.Add(n)
	w.Submit(Append{Group: 1000, Entries: []*raftpb.Entry{ent(1, 1, "first")}}, func(error) {})
	soon.True(t, 20*time.Second, "first sync", func() bool { mu.Lock(); defer mu.Unlock(); return len(syncs) == 1 })
	for g := uint64(1); g <= n; g++ {
		w.Submit(Append{Group: g, Entries: []*raftpb.Entry{ent(1, 1, "x")}, HardState: hs(1, 0, 1)}, func(err error) {
			if err != nil {
				t.Error(err)
			}
			wg.Done()
		})
	}
	close(release)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(syncs) != 2 || syncs[1].Groups != n || syncs[1].Entries != n {
		t.Fatalf("syncs %+v: want the %d queued submissions in one sync", syncs, n)
	}
}

func TestMergeHardState(t *testing.T) {
	cases := []struct{ a, b, want *raftpb.HardState }{
		{hs(1, 0, 5), hs(1, 2, 3), hs(1, 2, 5)},
		{hs(2, 0, 1), hs(1, 3, 9), hs(2, 0, 9)},
		{nil, hs(1, 1, 1), hs(1, 1, 1)},
		{hs(3, 1, 7), hs(3, 1, 6), hs(3, 1, 7)},
	}
	for _, c := range cases {
		for _, swap := range []bool{false, true} {
			a, b := c.a, c.b
			if swap {
				a, b = b, a
			}
			got := MergeHardState(a, b)
			if got.GetTerm() != c.want.GetTerm() || got.GetVote() != c.want.GetVote() || got.GetCommit() != c.want.GetCommit() {
				t.Fatalf("merge(%v,%v)=%v want %v", a, b, got, c.want)
			}
		}
	}
}

func TestSubmitAfterCloseFails(t *testing.T) {
	w, _ := openWAL(t, t.TempDir(), &zeroSource{size: 64 << 10})
	w.Close()
	ch := make(chan error, 1)
	w.Submit(Append{Group: 1, HardState: hs(1, 0, 0)}, func(err error) { ch <- err })
	if err := <-ch; !errors.Is(err, ErrClosed) {
		t.Fatalf("submit after close: %v", err)
	}
}

func TestRandomizedRecovery(t *testing.T) {
	// Random appends with truncations over small segments; the recovered log
	// of every group equals a model kept in memory.
	rng := rand.New(rand.NewSource(7))
	dir := t.TempDir()
	src := &zeroSource{size: 48 << 10}
	w, _ := openWAL(t, dir, src)
	model := map[uint64][]*raftpb.Entry{}
	term := uint64(1)
	for step := 0; step < 400; step++ {
		g := uint64(rng.Intn(6) + 1)
		cur := model[g]
		start := uint64(len(cur)) + 1
		if len(cur) > 3 && rng.Intn(5) == 0 {
			start = uint64(rng.Intn(len(cur))) + 1 // overwrite a suffix
			term++
		}
		var ents []*raftpb.Entry
		for k := 0; k < rng.Intn(4)+1; k++ {
			ents = append(ents, ent(start+uint64(k), term, fmt.Sprintf("s%d-%d-%s", step, k, bytes.Repeat([]byte("r"), rng.Intn(600)))))
		}
		submitSync(t, w, Append{Group: g, Entries: ents})
		model[g] = append(cur[:start-1], ents...)
	}
	w.Close()
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	for g, want := range model {
		checkEntries(t, logs[g], want)
	}
}

// TestEmptyAppendIsNotASync: an append with nothing to log (a commit index
// only, which the copyset does not write) completes without a group commit
// being reported: it wrote and synced nothing, and the fsync count in the
// metrics must say so.
func TestEmptyAppendIsNotASync(t *testing.T) {
	var mu sync.Mutex
	var syncs []SyncInfo
	w, _, err := Open(Options{Dir: t.TempDir(), Source: &zeroSource{size: 1 << 20}, OnSync: func(si SyncInfo) {
		mu.Lock()
		syncs = append(syncs, si)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{ent(1, 1, "x")}})
	submitSync(t, w, Append{Group: 1})
	submitSync(t, w, Append{Group: 2})
	mu.Lock()
	defer mu.Unlock()
	if len(syncs) != 1 || syncs[0].Entries != 1 || syncs[0].Bytes == 0 {
		t.Fatalf("reported group commits %+v, want the one that wrote an entry", syncs)
	}
}

// TestWritesEndOnPageBoundaries: every group commit writes whole pages, so
// the kernel never reads a segment page (dropped from the cache after
// formatting) before it can write it; the padding leaves every record
// readable, across segment ends too.
func TestWritesEndOnPageBoundaries(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 64 << 10}
	var mu sync.Mutex
	var writes, unaligned int
	w, _, err := Open(Options{Dir: dir, Source: src, TestingKnobs: TestingKnobs{
		BeforeWrite: func(seq uint64, off int64, n int) {
			mu.Lock()
			defer mu.Unlock()
			writes++
			if end := off + int64(n); end%pageSize != 0 && end != src.size {
				unaligned++
			}
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var want []*raftpb.Entry
	for i := uint64(1); i <= 60; i++ {
		e := ent(i, 1, string(bytes.Repeat([]byte{byte(i)}, 1000+int(i)*37)))
		want = append(want, e)
		submitSync(t, w, Append{Group: 7, Entries: []*raftpb.Entry{e}, HardState: hs(1, 1, i)})
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if got, _ := src.counts(); got < 2 {
		t.Fatalf("the log used %d segment(s); the test needs it to cross a segment end", got)
	}
	if writes < 60 || unaligned != 0 {
		t.Fatalf("%d of %d writes ended inside a page", unaligned, writes)
	}
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[7], want)
}

// TestWriterLetsReadySubmittersJoinTheBatch submits two appends with one
// P: the second from a goroutine that is ready to run when the first wakes
// the writer. The writer yields before it takes the queue, so both go out
// in one group commit; a writer that took the queue at once would write
// the first alone and the second in a commit of its own. Not every trial
// coalesces: the scheduler looks at its global queue first on one turn in
// 61, which is where a yield puts the writer. And under the race detector
// the scheduler ignores the ready goroutine's place at the front of the run
// queue half the time, which lets it go first without a yield too. So at
// least 17 of 20 trials must coalesce: without the yield about half do
// under the race detector (passing with probability ~0.1%), none without
// it; with the yield about 60 in 61 do (failing with probability ~0.04%).
func TestWriterLetsReadySubmittersJoinTheBatch(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var log syncLog
	w, _, err := Open(Options{Dir: t.TempDir(), Source: &zeroSource{size: 1 << 20}, OnSync: log.add})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	done := make(chan error, 2)
	wait := func(n int) {
		t.Helper()
		for range n {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
	}
	// One commit first, so that the writer has started its segment.
	w.Submit(Append{Group: 1, Entries: []*raftpb.Entry{ent(1, 1, "start")}}, func(err error) { done <- err })
	wait(1)
	joined := 0
	const trials, want = 20, 17
	for i := uint64(1); i <= trials; i++ {
		waitIdle(t, w) // no commit in progress
		before := len(log.get())
		go w.Submit(Append{Group: 2, Entries: []*raftpb.Entry{ent(i, 1, "ready")}}, func(err error) { done <- err })
		w.Submit(Append{Group: 1, Entries: []*raftpb.Entry{ent(i+1, 1, "first")}}, func(err error) { done <- err })
		wait(2)
		if s := log.get()[before:]; len(s) == 1 && s[0].Groups == 2 {
			joined++
		}
	}
	if joined < want {
		t.Fatalf("both appends went out in one group commit in %d of %d trials, want at least %d", joined, trials, want)
	}
}
