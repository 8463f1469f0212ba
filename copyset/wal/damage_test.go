package wal

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/faultfs"
)

// fillSegments writes n entries of group g (payload bytes each) and returns
// them; small segments make the log span several.
func fillSegments(t *testing.T, w *WAL, g uint64, from, n uint64, payload int) []*raftpb.Entry {
	t.Helper()
	var out []*raftpb.Entry
	for i := from; i < from+n; i++ {
		e := ent(i, 1, fmt.Sprintf("%d-%s", i, bytes.Repeat([]byte("d"), payload)))
		submitSync(t, w, Append{Group: g, Entries: []*raftpb.Entry{e}, HardState: hs(1, 1, i)})
		out = append(out, e)
	}
	return out
}

func segmentFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "0*.wal"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// flipByte flips one byte at off of a file.
func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := []byte{0}
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptMiddleSegmentIsErrCorrupt flips one byte of an acknowledged
// record in the first of several segments: recovery must refuse the log, not
// end it there and recycle every later segment.
func TestCorruptMiddleSegmentIsErrCorrupt(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 64 << 10}
	w, _ := openWAL(t, dir, src)
	fillSegments(t, w, 1, 1, 60, 4000)
	w.Close()
	segs := segmentFiles(t, dir)
	if len(segs) < 4 {
		t.Fatalf("only %d segments", len(segs))
	}
	flipByte(t, segs[0], headerBlockSize+recordHeaderSize+100)
	_, _, err := Open(Options{Dir: dir, Source: src})
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with a damaged first segment: err = %v, want ErrCorrupt", err)
	}
	if got := len(segmentFiles(t, dir)); got != len(segs) {
		t.Fatalf("recovery removed segments of a damaged log: %d left of %d", got, len(segs))
	}
}

// TestMissingMiddleSegmentIsErrCorrupt removes a segment between others.
func TestMissingMiddleSegmentIsErrCorrupt(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 64 << 10}
	w, _ := openWAL(t, dir, src)
	fillSegments(t, w, 1, 1, 60, 4000)
	w.Close()
	segs := segmentFiles(t, dir)
	if err := os.Remove(segs[1]); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Open(Options{Dir: dir, Source: src}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("open with a missing segment: err = %v, want ErrCorrupt", err)
	}
}

// TestCorruptCompleteRecordInLastSegmentIsErrCorrupt damages a record of
// the last segment whose every sector is on disk: that is not a torn write.
func TestCorruptCompleteRecordInLastSegmentIsErrCorrupt(t *testing.T) {
	for _, which := range []string{"first", "last"} {
		t.Run(which, func(t *testing.T) {
			dir := t.TempDir()
			src := &zeroSource{size: 1 << 20}
			w, _ := openWAL(t, dir, src)
			var offs []int64
			off := int64(headerBlockSize)
			for i := uint64(1); i <= 40; i++ {
				e := ent(i, 1, string(bytes.Repeat([]byte{byte('a' + i%26)}, 3000)))
				submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{e}})
				offs = append(offs, off)
				off += int64(recordHeaderSize + entriesPayloadSize([]*raftpb.Entry{e}))
			}
			w.Close()
			segs := segmentFiles(t, dir)
			if len(segs) != 1 {
				t.Fatalf("%d segments", len(segs))
			}
			target := offs[0]
			if which == "last" {
				target = offs[len(offs)-1]
			}
			flipByte(t, segs[0], target+recordHeaderSize+50)
			if _, _, err := Open(Options{Dir: dir, Source: src}); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("open: err = %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestTornLastRecordIsCut zeroes one sector in the middle of the last
// record, as a power cut during its write leaves it: the record was never
// acknowledged and recovery cuts it.
func TestTornLastRecordIsCut(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	w, _ := openWAL(t, dir, src)
	a := ent(1, 1, string(bytes.Repeat([]byte("a"), 3000)))
	b := ent(2, 1, string(bytes.Repeat([]byte("b"), 3000)))
	submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{a}})
	submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{b}})
	w.Close()
	bOff := int64(headerBlockSize + recordHeaderSize + entriesPayloadSize([]*raftpb.Entry{a}))
	sector := (bOff/sectorSize + 2) * sectorSize
	f, err := os.OpenFile(segmentFiles(t, dir)[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, sectorSize), sector); err != nil {
		t.Fatal(err)
	}
	f.Close()
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	checkEntries(t, logs[1], []*raftpb.Entry{a})
}

// tornBatch writes batch at off of a segment, as an interrupted group commit
// starting at the synced offset off does, then puts the pages in lost back
// to their content at the last sync (zeros from off on), as a power cut that
// writes back only some of the batch's 4 KiB pages leaves them.
func tornBatch(t *testing.T, path string, off int64, batch []byte, lost ...int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(batch, off); err != nil {
		t.Fatal(err)
	}
	const page = 4096
	for _, p := range lost {
		from := max(p*page, off)
		if _, err := f.WriteAt(make([]byte, (p+1)*page-from), from); err != nil {
			t.Fatal(err)
		}
	}
}

// TestTornBatchIsNotCorruption cuts the power in the middle of a group
// commit that spans several pages, keeping some of its pages and losing
// others, in the shapes where the first invalid record holds no whole zero
// sector: its header lost with the page it starts in (the length reads 0, so
// the record looks 17 bytes long and complete), or a small record across a
// page boundary whose second part is lost. Later pages of the batch survive.
// Nothing of the batch was acknowledged: recovery must cut it, not refuse
// the log as damaged (after a power cut of a whole copyset, that left two of
// three replicas unable to start).
func TestTornBatchIsNotCorruption(t *testing.T) {
	data := func(n int, c byte) string { return string(bytes.Repeat([]byte{c}, n)) }
	rec := func(e *raftpb.Entry) []byte {
		return appendRecord(nil, 1, recEntries, 1, appendEntriesPayload(nil, []*raftpb.Entry{e}))
	}
	acked := []*raftpb.Entry{ent(1, 1, data(1000, 'a')), ent(2, 1, data(1000, 'b'))}
	// The acknowledged records end mid-page: the batch starts there.
	synced := int64(headerBlockSize + 2*(recordHeaderSize+entriesPayloadSize(acked[:1])))
	for _, tc := range []struct {
		name  string
		batch func() ([]byte, []*raftpb.Entry) // the torn batch and what recovery keeps of it
		lost  []int64
	}{{
		name: "first page lost",
		batch: func() ([]byte, []*raftpb.Entry) {
			var b []byte
			for i := uint64(3); i <= 6; i++ {
				b = append(b, rec(ent(i, 1, data(1500, byte('a'+i))))...)
			}
			return b, nil
		},
		lost: []int64{synced / 4096},
	}, {
		name: "small record across a lost page",
		batch: func() ([]byte, []*raftpb.Entry) {
			// An entries record up to 24 bytes before the page boundary, a
			// hard state record across it, then a long record over the next
			// two pages.
			boundary := (synced/4096 + 1) * 4096
			e3 := ent(3, 1, data(int(boundary-24-synced)-recordHeaderSize-entriesPayloadSize([]*raftpb.Entry{ent(3, 1, "")}), 'c'))
			b := rec(e3)
			if synced+int64(len(b)) != boundary-24 {
				t.Fatalf("entries record ends at %d, want %d", synced+int64(len(b)), boundary-24)
			}
			b = appendRecord(b, 1, recHardState, 1, appendHardStatePayload(nil, hs(1, 1, 3)))
			b = append(b, rec(ent(4, 1, data(5000, 'd')))...)
			return b, []*raftpb.Entry{e3}
		},
		lost: []int64{synced/4096 + 1},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			src := &zeroSource{size: 1 << 20}
			w, _ := openWAL(t, dir, src)
			for _, e := range acked {
				submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{e}})
			}
			w.Close()
			batch, kept := tc.batch()
			tornBatch(t, segmentFiles(t, dir)[0], synced, batch, tc.lost...)

			w, logs := openWAL(t, dir, src)
			want := append(slices.Clone(acked), kept...)
			checkEntries(t, logs[1], want)
			// The cut zeroed what survived of the batch: the next append
			// goes where it was, and nothing of it comes back after.
			next := ent(uint64(len(want)+1), 2, "after")
			submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{next}})
			w.Close()
			w, logs = openWAL(t, dir, src)
			defer w.Close()
			checkEntries(t, logs[1], append(want, next))
		})
	}
}

// TestCorruptSmallRecordInLastSegmentIsErrCorrupt damages acknowledged
// records of the last segment that hold no whole sector of their own (a
// hard state record) or whose header is wiped while the rest of the record
// shares its sector: every sector is on disk, so this is not a torn write.
func TestCorruptSmallRecordInLastSegmentIsErrCorrupt(t *testing.T) {
	const batches = 10
	// Each batch: an entries record with 3000 bytes of data, then a hard
	// state record.
	entriesSize := int64(recordHeaderSize + entriesPayloadSize([]*raftpb.Entry{ent(1, 1, string(make([]byte, 3000)))}))
	batchSize := entriesSize + recordHeaderSize + 24
	fifth := int64(headerBlockSize) + 4*batchSize
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, path string)
	}{{
		name:   "hard state flipped",
		damage: func(t *testing.T, path string) { flipByte(t, path, fifth+entriesSize+recordHeaderSize+3) },
	}, {
		name: "header zeroed",
		damage: func(t *testing.T, path string) {
			if fifth%sectorSize+recordHeaderSize >= sectorSize-8 {
				t.Fatalf("record at %d: its payload does not share the header's sector", fifth)
			}
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(make([]byte, recordHeaderSize), fifth); err != nil {
				t.Fatal(err)
			}
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			src := &zeroSource{size: 1 << 20}
			w, _ := openWAL(t, dir, src)
			for i := uint64(1); i <= batches; i++ {
				e := ent(i, 1, string(bytes.Repeat([]byte{byte('a' + i)}, 3000)))
				submitSync(t, w, Append{Group: 1, Entries: []*raftpb.Entry{e}, HardState: hs(1, 1, i)})
			}
			w.Close()
			segs := segmentFiles(t, dir)
			if len(segs) != 1 {
				t.Fatalf("%d segments", len(segs))
			}
			tc.damage(t, segs[0])
			if _, _, err := Open(Options{Dir: dir, Source: src}); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("open: err = %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestForgetThenRecreate forgets a group and starts it again: the old
// records are gone after a restart, and the new records pin their
// segments like any others.
func TestForgetThenRecreate(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 32 << 10}
	w, _ := openWAL(t, dir, src)
	fillSegments(t, w, 5, 1, 30, 2000)
	if err := w.Forget(5); err != nil {
		t.Fatal(err)
	}
	// The copyset is created again: a snapshot at 1, then new entries.
	cs := &raftpb.ConfState{Voters: []uint64{1, 2, 3}}
	fresh := []*raftpb.Entry{ent(2, 1, "new-2"), ent(3, 1, "new-3")}
	submitSync(t, w, Append{Group: 5, Snapshot: &SnapshotMark{Index: 1, Term: 1, ConfState: cs}, Entries: fresh, HardState: hs(1, 1, 3)})
	// Another group fills and checkpoints many segments; the new group's
	// records must keep theirs.
	fillSegments(t, w, 6, 1, 80, 2000)
	w.SetCheckpoint(6, 80, hs(1, 1, 80))
	submitSync(t, w, Append{Group: 6, HardState: hs(1, 1, 80)})
	w.Close()
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	gl := logs[5]
	if gl == nil || gl.Snapshot == nil || gl.Snapshot.Index != 1 {
		t.Fatalf("recreated group's snapshot mark lost: %+v", gl)
	}
	checkEntries(t, gl, fresh)
}

// TestForgottenRecordsDoNotComeBack forgets a group whose records are still
// in the log and restarts: recovery must not hand them back.
func TestForgottenRecordsDoNotComeBack(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	w, _ := openWAL(t, dir, src)
	fillSegments(t, w, 5, 1, 10, 100)
	if err := w.Forget(5); err != nil {
		t.Fatal(err)
	}
	w.Close()
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	if gl := logs[5]; gl != nil {
		t.Fatalf("forgotten group recovered with %d entries", len(gl.Entries))
	}
}

// TestOverwrittenEntriesDoNotPin logs a long tail that a new leader then
// overwrites from a low index: once the group checkpoints past the new
// entries, the segments holding only the overwritten tail are recycled.
func TestOverwrittenEntriesDoNotPin(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 32 << 10}
	w, _ := openWAL(t, dir, src)
	defer w.Close()
	fillSegments(t, w, 1, 1, 200, 1000)
	held := w.Stats().Segments
	if held < 6 {
		t.Fatalf("only %d segments", held)
	}
	// A new leader overwrites from index 6.
	var repl []*raftpb.Entry
	for i := uint64(6); i <= 10; i++ {
		repl = append(repl, ent(i, 2, "r"))
	}
	submitSync(t, w, Append{Group: 1, Entries: repl, HardState: hs(2, 2, 10)})
	w.SetCheckpoint(1, 10, hs(2, 2, 10))
	submitSync(t, w, Append{Group: 2, Entries: []*raftpb.Entry{ent(1, 1, "kick")}})
	w.SetCheckpoint(2, 1, nil)
	soon.True(t, 20*time.Second, "segments holding only overwritten entries recycled", func() bool { return w.Stats().Segments <= 2 })
}

// TestSnapshotMarkReleasesOlderEntries: after a snapshot mark, entries
// before it no longer pin segments.
func TestSnapshotMarkReleasesOlderEntries(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 32 << 10}
	w, _ := openWAL(t, dir, src)
	defer w.Close()
	fillSegments(t, w, 1, 1, 100, 1000)
	cs := &raftpb.ConfState{Voters: []uint64{1, 2, 3}}
	submitSync(t, w, Append{Group: 1, Snapshot: &SnapshotMark{Index: 50, Term: 1, ConfState: cs, ConfEpoch: 7}, HardState: hs(3, 2, 50)})
	w.SetCheckpoint(1, 50, hs(3, 2, 50))
	submitSync(t, w, Append{Group: 2, Entries: []*raftpb.Entry{ent(1, 1, "kick")}})
	w.SetCheckpoint(2, 1, nil)
	soon.True(t, 20*time.Second, "segments older than the snapshot mark recycled", func() bool { return w.Stats().Segments <= 2 })
}

// TestSnapshotMarkKeepsConfEpoch: the configuration epoch recorded with a
// snapshot mark comes back at recovery.
func TestSnapshotMarkKeepsConfEpoch(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 1 << 20}
	w, _ := openWAL(t, dir, src)
	cs := &raftpb.ConfState{Voters: []uint64{1, 2, 4}}
	submitSync(t, w, Append{Group: 3, Snapshot: &SnapshotMark{Index: 40, Term: 2, ConfState: cs, ConfEpoch: 33}})
	w.Close()
	w, logs := openWAL(t, dir, src)
	defer w.Close()
	s := logs[3].Snapshot
	if s == nil || s.Index != 40 || s.ConfEpoch != 33 || len(s.ConfState.GetVoters()) != 3 {
		t.Fatalf("snapshot mark %+v", s)
	}
}

// TestSegmentIsSyncedBeforeTheNextHeader: when the writer starts a segment,
// nothing it wrote before is still unsynced on the disk. Otherwise a power
// cut could keep the new segment's header and lose the end of the segment
// before it, a hole that recovery must call corruption.
func TestSegmentIsSyncedBeforeTheNextHeader(t *testing.T) {
	disk := faultfs.MountForTest(t, faultfs.Options{})
	src := &serialSource{zeroSource: zeroSource{size: 64 << 10}}
	var mu sync.Mutex
	var headers, dirty int
	w, _, err := Open(Options{Dir: disk.Path("wal"), Source: src, TestingKnobs: TestingKnobs{
		BeforeWrite: func(seq uint64, off int64, _ int) {
			if off != 0 || seq == 1 {
				return
			}
			// A spare segment the source is formatting meanwhile is not
			// a write of the log: look only between formats.
			src.busy.Lock()
			st := disk.Stats()
			src.busy.Unlock()
			mu.Lock()
			headers++
			if st.UnsyncedFiles != 0 {
				dirty++
			}
			mu.Unlock()
		},
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var wg sync.WaitGroup
	for g := uint64(1); g <= 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint64(1); i <= 150; i++ {
				submitSync(t, w, Append{Group: g, Entries: []*raftpb.Entry{ent(i, 1, string(bytes.Repeat([]byte("s"), 900)))}})
			}
		}()
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if headers < 3 {
		t.Fatalf("only %d segments started", headers)
	}
	if dirty != 0 {
		t.Fatalf("%d of %d segments were started while earlier writes were not yet synced", dirty, headers)
	}
}

// serialSource formats one segment at a time and lets a test wait for a
// format to finish.
type serialSource struct {
	zeroSource
	busy sync.Mutex
}

func (s *serialSource) Get(dst string) error {
	s.busy.Lock()
	defer s.busy.Unlock()
	return s.zeroSource.Get(dst)
}

// TestDroppedLastSegmentNumberIsReused: a last segment whose header never
// reached the disk is dropped at recovery, and the next segment takes its
// number. Skipping it left a hole between the segments before and after,
// and the next recovery refused the log as corrupt.
func TestDroppedLastSegmentNumberIsReused(t *testing.T) {
	dir := t.TempDir()
	src := &zeroSource{size: 32 << 10}
	w, _ := openWAL(t, dir, src)
	fillSegments(t, w, 1, 1, 90, 1000)
	w.Close()
	segs := segmentFiles(t, dir)
	if len(segs) < 3 {
		t.Fatalf("only %d segments", len(segs))
	}
	// A crash right after a rollover: the new segment holds the zeros of a
	// formatted file.
	last := segs[len(segs)-1]
	if err := os.WriteFile(last, make([]byte, src.size), 0o644); err != nil {
		t.Fatal(err)
	}
	w, logs := openWAL(t, dir, src)
	kept := len(logs[1].Entries)
	// Append until the log rolls over into a new segment.
	fillSegments(t, w, 1, uint64(kept)+1, 40, 1000)
	w.Close()
	w, logs = openWAL(t, dir, src)
	defer w.Close()
	if got := len(logs[1].Entries); got != kept+40 {
		t.Fatalf("recovered %d entries, want %d", got, kept+40)
	}
}
