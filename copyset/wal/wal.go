package wal

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// SegmentSource hands out preformatted, zero-filled files for segments and
// takes them back. The chunk file pool implements it.
type SegmentSource interface {
	// Get moves a clean file to dst, which must not exist.
	Get(dst string) error
	// Recycle takes a file back; it is zeroed before it is handed out again.
	Recycle(path string) error
	// FileSize is the size of every file the source hands out.
	FileSize() int64
}

// SnapshotMark records that a group's log restarts after a snapshot: entries
// at or below Index are gone and the group's configuration is ConfState.
type SnapshotMark struct {
	Index     uint64
	Term      uint64
	ConfState *raftpb.ConfState
}

// Append is one group's submission: entries to append (replacing any logged
// entries at or above the first one's index), a new hard state, and/or a
// snapshot mark written before the entries.
type Append struct {
	Group     uint64
	Snapshot  *SnapshotMark
	Entries   []*raftpb.Entry
	HardState *raftpb.HardState
}

// GroupLog is what recovery found for one group, in log order: the latest
// snapshot mark, the entries after it (truncations applied) and the latest
// hard state. Entries may include some at or below the group's checkpoint.
type GroupLog struct {
	Snapshot  *SnapshotMark
	Entries   []*raftpb.Entry
	HardState *raftpb.HardState
}

// SyncInfo describes one group commit, for metrics.
type SyncInfo struct {
	Duration time.Duration // time spent in fdatasync
	Entries  int           // entries made durable
	Groups   int           // submissions in the batch
	Bytes    int           // bytes written
}

// Options configure a WAL.
type Options struct {
	// Dir holds the segments; it is created if missing.
	Dir string
	// Source supplies and takes back segment files.
	Source SegmentSource
	// MaxBatchBytes caps the bytes written by one group commit (default 4 MiB).
	MaxBatchBytes int
	// OnSync, if set, is called after every group commit.
	OnSync func(SyncInfo)
	// OnPressure, if set, is called (from the writer goroutine; it must not
	// block) when a new segment is started, with the number of segments in
	// use, and repeatedly while no segment can be had. The owner checkpoints
	// the groups that pin old segments (see PinningGroups).
	OnPressure func(segments int)
	Logger     *slog.Logger
}

// ErrClosed is returned for submissions to a closed WAL.
var ErrClosed = errors.New("wal: closed")

// segment is one segment file.
type segment struct {
	seq       uint64
	path      string
	f         *os.File
	writeOff  int64 // next byte to write
	syncedOff int64 // bytes known durable
	closed    bool  // end-of-segment record written
	// per group: highest entry index and whether a hard state or snapshot
	// record is held here.
	groups map[uint64]*segGroup
}

type segGroup struct {
	maxIndex uint64 // highest entry (or snapshot) index held for the group
	hs       bool   // holds a hard state record of the group
}

type request struct {
	a    Append
	done func(error)
}

// hsInfo is the latest durable hard state of a group and where it lies.
type hsInfo struct {
	hs  *raftpb.HardState
	seq uint64
}

// WAL is a write-ahead log shared by many Raft groups. Submit is safe for
// concurrent use; done callbacks run on the WAL's writer goroutine in
// submission order and must not block.
type WAL struct {
	opts     Options
	fileSize int64
	log      *slog.Logger

	mu struct {
		sync.Mutex
		queue   []request
		closed  bool
		crashed bool
		keep    float64           // fraction of an unsynced batch a crash leaves behind
		ckpt    map[uint64]uint64 // checkpointed index per group
		forgot  map[uint64]bool
		segs    []*segment                   // oldest first; the last is current
		lastHS  map[uint64]*hsInfo           // latest durable hard state per group
		ckptHS  map[uint64]*raftpb.HardState // hard state recorded by each group's checkpoint
	}
	wake chan struct{}

	// Owned by the writer goroutine (and Open before it starts).
	nextSeq uint64
	buf     []byte

	spareMu    sync.Mutex
	spareCond  *sync.Cond
	spareReady bool
	spareBusy  bool

	stopped chan struct{}
}

const sparePath = "spare.wal"

// Open opens (or creates) the WAL in opts.Dir, recovers every group's log and
// starts the writer. The returned map holds the recovered log per group.
func Open(opts Options) (*WAL, map[uint64]*GroupLog, error) {
	if opts.Source == nil {
		return nil, nil, errors.New("wal: no segment source")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	w := &WAL{
		opts:     opts,
		fileSize: opts.Source.FileSize(),
		log:      opts.Logger.With("component", "wal"),
		wake:     make(chan struct{}, 1),
		stopped:  make(chan struct{}),
	}
	if w.fileSize < 4*headerBlockSize {
		return nil, nil, fmt.Errorf("wal: segment size %d too small", w.fileSize)
	}
	if w.opts.MaxBatchBytes <= 0 {
		w.opts.MaxBatchBytes = 4 << 20
	}
	if int64(w.opts.MaxBatchBytes) > w.fileSize/2 {
		w.opts.MaxBatchBytes = int(w.fileSize / 2)
	}
	w.mu.ckpt = make(map[uint64]uint64)
	w.mu.forgot = make(map[uint64]bool)
	w.mu.lastHS = make(map[uint64]*hsInfo)
	w.mu.ckptHS = make(map[uint64]*raftpb.HardState)
	w.spareCond = sync.NewCond(&w.spareMu)
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, nil, fmt.Errorf("wal: create dir: %w", err)
	}
	logs, err := w.recover()
	if err != nil {
		w.closeFiles()
		return nil, nil, err
	}
	if _, err := os.Stat(filepath.Join(opts.Dir, sparePath)); err == nil {
		w.spareReady = true
	}
	go w.run()
	w.prepareSpare()
	return w, logs, nil
}

// recover reads every segment, rebuilds per-group logs and the recycling
// index, and cuts a torn tail.
func (w *WAL) recover() (map[uint64]*GroupLog, error) {
	des, err := os.ReadDir(w.opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("wal: list dir: %w", err)
	}
	type seginfo struct {
		seq  uint64
		name string
	}
	var found []seginfo
	for _, de := range des {
		name := de.Name()
		if name == sparePath || !strings.HasSuffix(name, ".wal") {
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, ".wal"), 16, 64)
		if err != nil {
			return nil, fmt.Errorf("wal: unexpected file %s in %s", name, w.opts.Dir)
		}
		found = append(found, seginfo{seq, name})
	}
	sort.Slice(found, func(i, j int) bool { return found[i].seq < found[j].seq })

	logs := make(map[uint64]*GroupLog)
	buf := make([]byte, w.fileSize)
	ended := false // the log ended before the segment being read
	for i, fi := range found {
		path := filepath.Join(w.opts.Dir, fi.name)
		if fi.seq >= w.nextSeq {
			w.nextSeq = fi.seq + 1
		}
		if ended {
			// Everything after the end of the log belongs to a batch that
			// was never acknowledged.
			w.log.Warn("dropping segment after the end of the log", "segment", fi.name)
			if err := w.opts.Source.Recycle(path); err != nil {
				return nil, fmt.Errorf("wal: recycle %s: %w", fi.name, err)
			}
			continue
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("wal: open %s: %w", fi.name, err)
		}
		if n, err := f.ReadAt(buf, 0); err != nil && n != len(buf) {
			f.Close()
			return nil, fmt.Errorf("wal: read %s: %w", fi.name, err)
		}
		seq, ok, err := decodeSegmentHeader(buf[:headerBlockSize])
		if err == nil && ok && seq != fi.seq {
			err = fmt.Errorf("%w: %s holds sequence %d", ErrCorrupt, fi.name, seq)
		}
		if err != nil || !ok {
			f.Close()
			if err != nil && i != len(found)-1 {
				return nil, fmt.Errorf("wal: segment %s: %w", fi.name, err)
			}
			// A last segment whose header never reached the disk holds
			// nothing that was acknowledged.
			w.log.Warn("dropping segment without a valid header", "segment", fi.name, "err", err)
			if err := w.opts.Source.Recycle(path); err != nil {
				return nil, fmt.Errorf("wal: recycle %s: %w", fi.name, err)
			}
			ended = true
			continue
		}
		seg := &segment{seq: seq, path: path, f: f, groups: make(map[uint64]*segGroup)}
		off := int64(headerBlockSize)
		for {
			rec, size, ok := decodeRecord(buf[off:], seq)
			if !ok {
				break
			}
			off += int64(size)
			if rec.typ == recEndSegment {
				seg.closed = true
				break
			}
			if err := w.applyRecord(logs, seg, rec); err != nil {
				f.Close()
				return nil, fmt.Errorf("wal: segment %s offset %d: %w", fi.name, off-int64(size), err)
			}
		}
		seg.writeOff, seg.syncedOff = off, off
		w.mu.segs = append(w.mu.segs, seg)
		if seg.closed {
			f.Close()
			seg.f = nil
			continue
		}
		// The log ends here. Cut whatever follows the last valid record so
		// that it can never be read back as records.
		if err := w.cutTail(seg); err != nil {
			return nil, err
		}
		ended = true
	}
	if w.nextSeq == 0 {
		w.nextSeq = 1
	}
	return logs, nil
}

// cutTail zeroes a segment from its write offset to the end and syncs it.
func (w *WAL) cutTail(seg *segment) error {
	zero := make([]byte, 1<<20)
	for off := seg.writeOff; off < w.fileSize; {
		n := min(int64(len(zero)), w.fileSize-off)
		if _, err := seg.f.WriteAt(zero[:n], off); err != nil {
			return fmt.Errorf("wal: cut tail of %s: %w", filepath.Base(seg.path), err)
		}
		off += n
	}
	if err := unix.Fdatasync(int(seg.f.Fd())); err != nil {
		return fmt.Errorf("wal: sync cut tail of %s: %w", filepath.Base(seg.path), err)
	}
	return nil
}

func (w *WAL) applyRecord(logs map[uint64]*GroupLog, seg *segment, rec record) error {
	gl := logs[rec.group]
	if gl == nil {
		gl = &GroupLog{}
		logs[rec.group] = gl
	}
	sg := seg.groups[rec.group]
	if sg == nil {
		sg = &segGroup{}
		seg.groups[rec.group] = sg
	}
	switch rec.typ {
	case recEntries:
		ents, err := decodeEntries(rec.payload)
		if err != nil {
			return err
		}
		if len(ents) == 0 {
			return nil
		}
		first := ents[0].GetIndex()
		if n := len(gl.Entries); n > 0 {
			base, last := gl.Entries[0].GetIndex(), gl.Entries[n-1].GetIndex()
			switch {
			case first > last+1:
				return fmt.Errorf("%w: group %d entries jump from %d to %d", ErrCorrupt, rec.group, last, first)
			case first <= base:
				gl.Entries = gl.Entries[:0]
			default:
				gl.Entries = gl.Entries[:first-base]
			}
		} else if gl.Snapshot != nil && first > gl.Snapshot.Index+1 {
			return fmt.Errorf("%w: group %d entries start at %d after snapshot %d", ErrCorrupt, rec.group, first, gl.Snapshot.Index)
		}
		gl.Entries = append(gl.Entries, ents...)
		sg.maxIndex = max(sg.maxIndex, ents[len(ents)-1].GetIndex())
	case recHardState:
		hs, err := decodeHardState(rec.payload)
		if err != nil {
			return err
		}
		gl.HardState = MergeHardState(gl.HardState, hs)
		sg.hs = true
		w.mu.lastHS[rec.group] = &hsInfo{hs: gl.HardState, seq: seg.seq}
	case recSnapshot:
		s, err := decodeSnapshot(rec.payload)
		if err != nil {
			return err
		}
		gl.Snapshot = s
		gl.Entries = nil
		sg.maxIndex = max(sg.maxIndex, s.Index)
	default:
		return fmt.Errorf("%w: unknown record type %d", ErrCorrupt, rec.typ)
	}
	return nil
}

// Submit queues a group's append. done is called with nil once everything in
// it is durable, or with an error if the WAL failed or closed first.
func (w *WAL) Submit(a Append, done func(error)) {
	w.mu.Lock()
	if w.mu.closed {
		w.mu.Unlock()
		done(ErrClosed)
		return
	}
	w.mu.queue = append(w.mu.queue, request{a: a, done: done})
	w.mu.Unlock()
	w.kick()
}

// SetCheckpoint records that group's state machine is durable up to index
// (chunk files synced and the applied index recorded by the copyset), so its
// entries at or below index are no longer needed, and that the copyset
// recorded hs (may be nil) beside it: hard state records no newer than hs
// are no longer needed either.
func (w *WAL) SetCheckpoint(group, index uint64, hs *raftpb.HardState) {
	w.mu.Lock()
	if index > w.mu.ckpt[group] {
		w.mu.ckpt[group] = index
	}
	if hs != nil {
		w.mu.ckptHS[group] = MergeHardState(w.mu.ckptHS[group], hs)
	}
	w.mu.Unlock()
	w.kick()
}

// hsCovered reports whether every hard state record of g in seg is
// superseded: by a newer record in a later segment, or by the checkpoint.
// w.mu held.
func (w *WAL) hsCoveredLocked(g uint64, seg *segment) bool {
	li := w.mu.lastHS[g]
	if li == nil || li.seq > seg.seq {
		return true
	}
	c := w.mu.ckptHS[g]
	return c != nil && hardStateEqual(MergeHardState(c, li.hs), c)
}

// segmentDoneLocked reports whether nothing in seg is needed any more.
func (w *WAL) segmentDoneLocked(seg *segment) bool {
	for g, sg := range seg.groups {
		if w.mu.forgot[g] {
			continue
		}
		if sg.maxIndex > w.mu.ckpt[g] || (sg.hs && !w.hsCoveredLocked(g, seg)) {
			return false
		}
	}
	return true
}

// PinningGroups returns the groups that keep any of the oldest n segments
// from being recycled; checkpointing each of them frees those segments.
func (w *WAL) PinningGroups(n int) []uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	seen := map[uint64]bool{}
	var out []uint64
	for i := 0; i < n && i < len(w.mu.segs)-1; i++ {
		seg := w.mu.segs[i]
		for g, sg := range seg.groups {
			if seen[g] || w.mu.forgot[g] {
				continue
			}
			if sg.maxIndex > w.mu.ckpt[g] || (sg.hs && !w.hsCoveredLocked(g, seg)) {
				seen[g] = true
				out = append(out, g)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Forget drops a group (its copyset was removed): its records no longer keep
// segments alive and its hard state is no longer carried forward.
func (w *WAL) Forget(group uint64) {
	w.mu.Lock()
	w.mu.forgot[group] = true
	delete(w.mu.ckpt, group)
	delete(w.mu.lastHS, group)
	delete(w.mu.ckptHS, group)
	w.mu.Unlock()
	w.kick()
}

func (w *WAL) kick() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Stats describes the WAL's segments.
type Stats struct {
	Segments      int
	OldestSegment uint64
}

// Stats reports the segments in use.
func (w *WAL) Stats() Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := Stats{Segments: len(w.mu.segs)}
	if len(w.mu.segs) > 0 {
		st.OldestSegment = w.mu.segs[0].seq
	}
	return st
}

// Close writes what was submitted, stops the writer and closes the files.
func (w *WAL) Close() error {
	w.mu.Lock()
	already := w.mu.closed
	w.mu.closed = true
	w.mu.Unlock()
	w.kick()
	<-w.stopped
	if !already {
		w.waitSpare()
		w.closeFiles()
	}
	return nil
}

// SimulateCrash stops the WAL as a power loss would. Submissions not yet
// durable are dropped (their callbacks get ErrClosed); a batch caught between
// its write and its fdatasync keeps only the first keep fraction (0..1) of
// its bytes, the rest zeroed as if the page cache had been lost mid-write.
// It is a fault-injection seam for tests.
func (w *WAL) SimulateCrash(keep float64) {
	w.mu.Lock()
	w.mu.closed = true
	w.mu.crashed = true
	w.mu.keep = keep
	w.mu.Unlock()
	w.kick()
	<-w.stopped
	w.waitSpare()
	w.closeFiles()
}

func (w *WAL) closeFiles() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.mu.segs {
		if s.f != nil {
			s.f.Close()
			s.f = nil
		}
	}
}

// run is the writer goroutine: it drains the queue into group commits and
// recycles segments when idle.
func (w *WAL) run() {
	defer close(w.stopped)
	for {
		w.mu.Lock()
		for len(w.mu.queue) == 0 && !w.mu.closed {
			w.mu.Unlock()
			w.recycle()
			<-w.wake
			w.mu.Lock()
		}
		batch := w.mu.queue
		w.mu.queue = nil
		closing, crashed := w.mu.closed, w.mu.crashed
		w.mu.Unlock()
		if crashed {
			for _, r := range batch {
				r.done(ErrClosed)
			}
			return
		}
		if len(batch) > 0 && !w.commit(batch) {
			return
		}
		w.recycle()
		if closing {
			w.mu.Lock()
			rest := w.mu.queue
			w.mu.queue = nil
			w.mu.Unlock()
			for _, r := range rest {
				r.done(ErrClosed)
			}
			return
		}
	}
}

// commit writes a batch in group commits of at most MaxBatchBytes and calls
// the callbacks. It reports false when the WAL can take no more writes.
func (w *WAL) commit(batch []request) bool {
	for len(batch) > 0 {
		n, size := 0, 0
		for n < len(batch) && (n == 0 || size < w.opts.MaxBatchBytes) {
			size += requestSize(batch[n].a)
			n++
		}
		err := w.writeBatch(batch[:n])
		for _, r := range batch[:n] {
			r.done(err)
		}
		if err != nil {
			if !errors.Is(err, ErrClosed) {
				w.log.Error("write-ahead log failed; refusing further appends", "err", err)
			}
			w.mu.Lock()
			w.mu.closed = true
			rest := w.mu.queue
			w.mu.queue = nil
			w.mu.Unlock()
			for _, r := range batch[n:] {
				r.done(err)
			}
			for _, r := range rest {
				r.done(err)
			}
			return false
		}
		batch = batch[n:]
	}
	return true
}

func requestSize(a Append) int {
	n := 0
	if a.Snapshot != nil {
		n += recordHeaderSize + 64
	}
	if len(a.Entries) > 0 {
		n += recordHeaderSize + entriesPayloadSize(a.Entries)
	}
	if a.HardState != nil {
		n += recordHeaderSize + 24
	}
	return n
}

// pending is one segment's share of a group commit.
type pending struct {
	seg *segment
	off int64
	buf []byte
}

// segUpdate is index bookkeeping applied once a batch is durable.
type segUpdate struct {
	seg      *segment
	group    uint64
	maxIndex uint64
	hs       *raftpb.HardState
}

func (w *WAL) writeBatch(batch []request) error {
	cur, err := w.current()
	if err != nil {
		return err
	}
	var parts []pending
	part := &pending{seg: cur, off: cur.writeOff, buf: w.buf[:0]}
	if cur.writeOff == 0 {
		part.buf = append(part.buf, make([]byte, headerBlockSize)...)
		encodeSegmentHeader(part.buf, cur.seq)
	}
	var updates []segUpdate
	entries := 0
	fits := func(n int) bool {
		// Always leave room for the end-of-segment record.
		return part.off+int64(len(part.buf))+int64(recordHeaderSize+n+recordHeaderSize) <= w.fileSize
	}
	emit := func(typ byte, group uint64, payload []byte, u segUpdate) error {
		if !fits(len(payload)) {
			part.buf = appendRecord(part.buf, part.seg.seq, recEndSegment, 0, nil)
			parts = append(parts, *part)
			next, err := w.rollover()
			if err != nil {
				return err
			}
			part = &pending{seg: next, buf: make([]byte, headerBlockSize, headerBlockSize+len(payload)+2*recordHeaderSize)}
			encodeSegmentHeader(part.buf, next.seq)
			if !fits(len(payload)) {
				return fmt.Errorf("wal: record of %d bytes does not fit in a segment of %d", len(payload), w.fileSize)
			}
		}
		part.buf = appendRecord(part.buf, part.seg.seq, typ, group, payload)
		u.seg, u.group = part.seg, group
		updates = append(updates, u)
		return nil
	}
	var scratch []byte
	limit := int(w.fileSize/4) - recordHeaderSize
	for _, r := range batch {
		a := r.a
		if a.Snapshot != nil {
			p, err := appendSnapshotPayload(scratch[:0], a.Snapshot)
			if err != nil {
				return err
			}
			if err := emit(recSnapshot, a.Group, p, segUpdate{maxIndex: a.Snapshot.Index}); err != nil {
				return err
			}
			scratch = p
		}
		// Split long entry lists so that every record fits a segment.
		for ents := a.Entries; len(ents) > 0; {
			k, sz := 0, 4
			for k < len(ents) {
				esz := 21 + len(ents[k].GetData())
				if k > 0 && sz+esz > limit {
					break
				}
				sz += esz
				k++
			}
			p := appendEntriesPayload(scratch[:0], ents[:k])
			if err := emit(recEntries, a.Group, p, segUpdate{maxIndex: ents[k-1].GetIndex()}); err != nil {
				return err
			}
			scratch = p
			entries += k
			ents = ents[k:]
		}
		if a.HardState != nil {
			p := appendHardStatePayload(scratch[:0], a.HardState)
			if err := emit(recHardState, a.Group, p, segUpdate{hs: a.HardState}); err != nil {
				return err
			}
			scratch = p
		}
	}
	parts = append(parts, *part)
	w.buf = part.buf[:0]

	written := 0
	for _, p := range parts {
		if _, err := p.seg.f.WriteAt(p.buf, p.off); err != nil {
			return fmt.Errorf("wal: write segment %016x: %w", p.seg.seq, err)
		}
		p.seg.writeOff = p.off + int64(len(p.buf))
		written += len(p.buf)
	}
	w.mu.Lock()
	crashed, keep := w.mu.crashed, w.mu.keep
	w.mu.Unlock()
	if crashed {
		// Power lost between the write and the sync: keep a torn prefix.
		tear := int64(float64(written) * keep)
		for _, p := range parts {
			n := int64(len(p.buf))
			if tear >= n {
				tear -= n
				continue
			}
			_, _ = p.seg.f.WriteAt(make([]byte, n-tear), p.off+tear)
			_ = unix.Fdatasync(int(p.seg.f.Fd()))
			tear = 0
		}
		return ErrClosed
	}
	start := time.Now()
	for _, p := range parts {
		if err := unix.Fdatasync(int(p.seg.f.Fd())); err != nil {
			return fmt.Errorf("wal: sync segment %016x: %w", p.seg.seq, err)
		}
		p.seg.syncedOff = p.seg.writeOff
	}
	elapsed := time.Since(start)

	w.mu.Lock()
	for _, u := range updates {
		sg := u.seg.groups[u.group]
		if sg == nil {
			sg = &segGroup{}
			u.seg.groups[u.group] = sg
		}
		sg.maxIndex = max(sg.maxIndex, u.maxIndex)
		if u.hs != nil {
			sg.hs = true
			if !w.mu.forgot[u.group] {
				var prev *raftpb.HardState
				if li := w.mu.lastHS[u.group]; li != nil {
					prev = li.hs
				}
				w.mu.lastHS[u.group] = &hsInfo{hs: MergeHardState(prev, u.hs), seq: u.seg.seq}
			}
		}
	}
	for _, p := range parts[:len(parts)-1] {
		// Finished segments are reopened by recovery; free their files.
		p.seg.closed = true
		p.seg.f.Close()
		p.seg.f = nil
	}
	w.mu.Unlock()
	if w.opts.OnSync != nil {
		w.opts.OnSync(SyncInfo{Duration: elapsed, Entries: entries, Groups: len(batch), Bytes: written})
	}
	return nil
}

// current returns the segment being written, starting one if needed.
func (w *WAL) current() (*segment, error) {
	w.mu.Lock()
	n := len(w.mu.segs)
	var last *segment
	if n > 0 {
		last = w.mu.segs[n-1]
	}
	w.mu.Unlock()
	if last != nil && !last.closed && last.f != nil {
		return last, nil
	}
	return w.rollover()
}

// rollover starts the next segment, from the spare when one is ready.
func (w *WAL) rollover() (*segment, error) {
	seq := w.nextSeq
	path := filepath.Join(w.opts.Dir, fmt.Sprintf("%016x.wal", seq))
	w.waitSpare()
	w.spareMu.Lock()
	ready := w.spareReady
	w.spareReady = false
	w.spareMu.Unlock()
	if ready {
		if err := os.Rename(filepath.Join(w.opts.Dir, sparePath), path); err != nil {
			return nil, fmt.Errorf("wal: take spare segment: %w", err)
		}
		if err := fsutil.SyncDir(w.opts.Dir); err != nil {
			return nil, err
		}
	} else if err := w.getSegment(path); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("wal: open new segment: %w", err)
	}
	seg := &segment{seq: seq, path: path, f: f, groups: make(map[uint64]*segGroup)}
	w.mu.Lock()
	w.mu.segs = append(w.mu.segs, seg)
	n := len(w.mu.segs)
	w.mu.Unlock()
	w.nextSeq = seq + 1
	w.prepareSpare()
	if w.opts.OnPressure != nil {
		w.opts.OnPressure(n)
	}
	return seg, nil
}

// getSegment takes a new segment from the source. When the source has none
// (the pool is full) it does not fail the log: it recycles what it can, asks
// the owner to checkpoint, and tries again, holding back every append
// meanwhile, until it gets one or the WAL is closed.
func (w *WAL) getSegment(path string) error {
	backoff := 5 * time.Millisecond
	for warned := false; ; {
		err := w.opts.Source.Get(path)
		if err == nil {
			return nil
		}
		w.mu.Lock()
		closed, n := w.mu.closed, len(w.mu.segs)
		w.mu.Unlock()
		if closed {
			return fmt.Errorf("wal: new segment: %w (%w)", err, ErrClosed)
		}
		if !warned {
			w.log.Warn("no segment available; appends wait for checkpoints to free one", "segments", n, "err", err)
			warned = true
		}
		if w.opts.OnPressure != nil {
			w.opts.OnPressure(n)
		}
		w.recycle()
		time.Sleep(backoff)
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

// prepareSpare fetches the next segment in the background so that a
// rollover does not wait on the pool.
func (w *WAL) prepareSpare() {
	w.spareMu.Lock()
	if w.spareReady || w.spareBusy {
		w.spareMu.Unlock()
		return
	}
	w.spareBusy = true
	w.spareMu.Unlock()
	go func() {
		err := w.opts.Source.Get(filepath.Join(w.opts.Dir, sparePath))
		w.spareMu.Lock()
		w.spareBusy = false
		w.spareReady = err == nil
		w.spareCond.Broadcast()
		w.spareMu.Unlock()
		if err != nil {
			w.log.Warn("cannot prepare a spare segment", "err", err)
		}
	}()
}

func (w *WAL) waitSpare() {
	w.spareMu.Lock()
	for w.spareBusy {
		w.spareCond.Wait()
	}
	w.spareMu.Unlock()
}

// recycle gives back the oldest segments that no group needs any more. Only
// a prefix of the log is ever recycled, so recovery never replays a record
// whose predecessors were dropped.
func (w *WAL) recycle() {
	for {
		w.mu.Lock()
		if len(w.mu.segs) < 2 || w.mu.crashed {
			w.mu.Unlock()
			return
		}
		old := w.mu.segs[0]
		if !old.closed || !w.segmentDoneLocked(old) {
			w.mu.Unlock()
			return
		}
		w.mu.segs = w.mu.segs[1:]
		w.mu.Unlock()
		if err := w.opts.Source.Recycle(old.path); err != nil {
			w.log.Error("cannot recycle segment", "segment", filepath.Base(old.path), "err", err)
			return
		}
	}
}

func hardStateEqual(a, b *raftpb.HardState) bool {
	return a.GetTerm() == b.GetTerm() && a.GetVote() == b.GetVote() && a.GetCommit() == b.GetCommit()
}
