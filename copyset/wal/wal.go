package wal

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// SegmentSource hands out preformatted, zero-filled files for segments and
// takes them back. The chunk file pool implements it.
type SegmentSource interface {
	// Get moves a clean file to dst, which must not exist. An error
	// wrapping chunkfilepool.ErrPoolEmpty means the source has no file to
	// give now: the log then waits for checkpoints to free segments and
	// asks again. Any other error (a failing disk) fails the log.
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
	// ConfEpoch is the copyset's configuration epoch at Index (0 when read
	// from a record written before it was kept).
	ConfEpoch uint64
	// Requests is the copyset's table of applied client requests at Index,
	// opaque to the WAL.
	Requests []byte
}

// Append is one group's submission: entries to append (replacing any logged
// entries at or above the first one's index), a new hard state, and/or a
// snapshot mark written before the entries.
type Append struct {
	Group uint64
	// Forget, written first, makes every earlier record of the group
	// obsolete (see WAL.Forget).
	Forget    bool
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
	Inline   bool          // written by a TryCommit caller
}

// Options configure a WAL.
type Options struct {
	// Dir holds the segments; it is created if missing.
	Dir string
	// Source supplies and takes back segment files.
	Source SegmentSource
	// MaxBatchBytes caps the bytes written by one group commit (default 4 MiB).
	MaxBatchBytes int
	// OnSync, if set, is called after every group commit that wrote (and
	// so fdatasynced) records.
	OnSync func(SyncInfo)
	// OnPressure, if set, is called (from the writer goroutine; it must not
	// block) when a new segment is started, with the number of segments in
	// use, and repeatedly while no segment can be had. The owner checkpoints
	// the groups that pin old segments (see PinningGroups).
	OnPressure func(segments int)
	Logger     *slog.Logger
	// InlineIdle is how long the log must have been without a commit for
	// TryCommit to write on its caller (default 300µs; negative: never).
	// Within it, appends are arriving faster than one fdatasync apart and
	// are left to the writer, which commits them together.
	InlineIdle time.Duration
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// TestingKnobs let tests watch the writer's steps.
type TestingKnobs struct {
	// BeforeWrite is called before the writer writes n bytes to segment
	// seq at off (off 0 is the write that starts with the segment's header).
	BeforeWrite func(seq uint64, off int64, n int)
}

// ErrClosed is returned for submissions to a closed WAL.
var ErrClosed = errors.New("wal: closed")

// segment is one segment file.
type segment struct {
	seq       uint64
	path      string
	f         *os.File
	direct    *os.File // f's file opened with O_DIRECT (direct.go), at first write
	noDirect  bool     // the filesystem or device refused O_DIRECT writes
	tail      []byte   // the log's bytes from the start of writeOff's page to writeOff, when known
	writeOff  int64    // next byte to write
	syncedOff int64    // bytes known durable
	closed    bool     // end-of-segment record written
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
// submission order and must not block. TryCommit writes on its caller.
type WAL struct {
	opts     Options
	fileSize int64
	log      *slog.Logger

	mu struct {
		sync.Mutex
		queue   []request
		closed  bool
		ckpt    map[uint64]uint64            // checkpointed index per group
		lastIdx map[uint64]uint64            // last durable entry (or snapshot) index per group
		segs    []*segment                   // oldest first; the last is current
		lastHS  map[uint64]*hsInfo           // latest durable hard state per group
		ckptHS  map[uint64]*raftpb.HardState // hard state recorded by each group's checkpoint
	}
	wake chan struct{}

	// commitMu is held by whoever writes the log: the writer goroutine,
	// or a caller of TryCommit. It guards what follows and the
	// segments' write state.
	commitMu   sync.Mutex
	nextSeq    uint64
	buf        []byte
	lastCommit time.Time // when the last group commit that wrote ended
	failed     bool      // a commit failed: the log takes nothing more
	inline     bool      // the commit in progress is a TryCommit caller's

	spareMu    sync.Mutex
	spareCond  *sync.Cond
	spareReady bool
	spareBusy  bool

	stopped   chan struct{}
	closeOnce sync.Once
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
		buf:      fsutil.AlignedBuffer(1 << 20)[:0], // page aligned for O_DIRECT (direct.go)
	}
	if w.fileSize < 4*headerBlockSize {
		return nil, nil, fmt.Errorf("wal: segment size %d too small", w.fileSize)
	}
	if w.opts.InlineIdle == 0 {
		w.opts.InlineIdle = 300 * time.Microsecond
	}
	if w.opts.MaxBatchBytes <= 0 {
		w.opts.MaxBatchBytes = 4 << 20
	}
	if int64(w.opts.MaxBatchBytes) > w.fileSize/2 {
		w.opts.MaxBatchBytes = int(w.fileSize / 2)
	}
	w.mu.ckpt = make(map[uint64]uint64)
	w.mu.lastIdx = make(map[uint64]uint64)
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

// TryCommit writes a on the calling goroutine when the log is idle:
// nothing queued or being written, no commit for Options.InlineIdle, and a
// small enough to fit the current segment (so that writing it starts no
// segment, which may wait for the pool). It reports whether it wrote; a is
// then complete (durable if err is nil), in order after everything
// submitted before it. When it reports false it wrote nothing, and the
// caller submits a instead.
//
// It spares a lone append the wake-up of the writer goroutine, which on a
// busy machine costs tens of microseconds: a follower makes a lone write
// durable and answers it on the goroutine that received it. Appends that
// come closer together than InlineIdle are left to the writer, which makes
// them durable together.
func (w *WAL) TryCommit(a Append) (wrote bool, err error) {
	if w.opts.InlineIdle <= 0 || requestSize(a) > inlineMaxBytes {
		return false, nil
	}
	w.mu.Lock()
	// Not blocking: commitMu is taken before mu everywhere else.
	if w.mu.closed || len(w.mu.queue) > 0 || !w.commitMu.TryLock() {
		w.mu.Unlock()
		return false, nil
	}
	if time.Since(w.lastCommit) < w.opts.InlineIdle || !w.fitsLocked(a) {
		w.commitMu.Unlock()
		w.mu.Unlock()
		return false, nil
	}
	w.mu.Unlock()
	defer func() {
		if r := recover(); r != nil {
			// A panic in the log ends the process, as it does on the
			// writer goroutine: the caller's Raft round, which contains
			// its own panics, must not swallow it and leave the log
			// locked.
			msg := fmt.Sprintf("wal: commit panicked: %v\n%s", r, debug.Stack())
			go panic(msg)
			select {}
		}
		w.inline = false
		w.commitMu.Unlock()
		if err != nil {
			w.kick() // the writer stops: the log failed
		}
	}()
	w.inline, wrote = true, true
	w.commit([]request{{a: a, done: func(e error) { err = e }}})
	return wrote, err
}

// inlineMaxBytes bounds the appends TryCommit writes: a larger one would
// hold its caller (a connection's reader) for long.
const inlineMaxBytes = 64 << 10

// fitsLocked reports whether a fits the current segment, so that writing it
// starts no segment (which may wait for the pool). w.mu and w.commitMu held.
func (w *WAL) fitsLocked(a Append) bool {
	n := len(w.mu.segs)
	if n == 0 {
		return false
	}
	cur := w.mu.segs[n-1]
	if cur.closed || cur.f == nil {
		return false
	}
	need := int64(requestSize(a)) + 2*recordHeaderSize + headerBlockSize
	return cur.writeOff+need <= w.fileSize
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
			if seen[g] {
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

// Forget durably drops groups whose copysets were removed: a record written
// to the log makes every earlier record of each group obsolete, at once and
// at recovery, so they no longer keep segments alive, their hard states are
// no longer carried forward, and a copyset created later with the same id
// starts with an empty log. It returns once the record is durable.
func (w *WAL) Forget(groups ...uint64) error {
	errs := make(chan error, len(groups))
	for _, g := range groups {
		w.Submit(Append{Group: g, Forget: true}, func(err error) { errs <- err })
	}
	for range groups {
		if err := <-errs; err != nil {
			return fmt.Errorf("wal: forget: %w", err)
		}
	}
	return nil
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
// It may be called more than once, and after the WAL failed.
func (w *WAL) Close() error {
	w.mu.Lock()
	w.mu.closed = true
	w.mu.Unlock()
	w.kick()
	<-w.stopped
	w.closeOnce.Do(func() {
		w.waitSpare()
		w.closeFiles()
	})
	return nil
}

func (w *WAL) closeFiles() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.mu.segs {
		s.closeFiles()
	}
}
