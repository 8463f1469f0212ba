package chunkfilepool

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/internal/geometry"
)

const (
	metaFileName  = "pool.meta"
	stateFileName = "pool.state"
	cleanDirName  = "clean"
	dirtyDirName  = "dirty"
	fmtDirName    = "formatting"

	// recycledPrefix names files that came back through Recycle; files the
	// pool formatted itself are named by their decimal ordinal.
	recycledPrefix = "r"

	defaultGetTimeout = 30 * time.Second
	writeUnit         = 1 << 20
)

// Options configure a Pool. Zero sizes take the production defaults.
type Options struct {
	// Dir is the pool directory. It must be on the same filesystem as the
	// directories files are handed out to.
	Dir string
	// ChunkSize, MetaPageSize and BlockSize give the geometry of every file.
	// They are recorded when the pool is first formatted; a later Open with
	// other values fails with ErrConfigMismatch.
	ChunkSize, MetaPageSize, BlockSize int64
	// InitialChunks is the number of files formatted in the background from
	// the start.
	InitialChunks int
	// MaxChunks bounds the files the pool owns (clean, dirty and handed
	// out). 0 means no bound other than ReserveBytes.
	MaxChunks int
	// ReserveBytes is the free space the pool leaves on the filesystem: it
	// formats no new file that would take the free space below it.
	ReserveBytes int64
	// FormatBytesPerSec throttles formatting and zeroing; 0 means unlimited.
	FormatBytesPerSec int64
	// LowWater: when clean plus dirty files drop below it (or below the
	// files handed out in the last demandWindow, when more), the pool formats
	// more. Default: 4.
	LowWater int
	// GrowBy is how many files one growth step adds. Default: 2*LowWater.
	GrowBy int
	// GetTimeout bounds how long Get waits for the formatter. Default: 30s.
	GetTimeout time.Duration
	// Logger receives progress and error logs. Default: discard.
	Logger *slog.Logger
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// TestingKnobs let tests reach states that are otherwise hard to produce.
type TestingKnobs struct {
	// BeforeWrite is called by the formatter before each write of zeros into
	// a file (name is the file's path, off the offset). A returned error
	// fails the write as if the filesystem had returned it.
	BeforeWrite func(name string, off int64) error
	// SkipSpaceCheck makes the pool grow without comparing free space with
	// ReserveBytes first, so that tests meet a real ENOSPC mid-format.
	SkipSpaceCheck bool
}

// Stats is a snapshot of the pool's accounting, cheap to take.
type Stats struct {
	// Clean files are formatted and ready to hand out.
	Clean int
	// Dirty files came back through Recycle and wait to be zeroed
	// (including the one being zeroed and any whose zeroing failed).
	Dirty int
	// Formatting is the number of files being formatted (redone after a
	// restart included).
	Formatting int
	// InUse is the number of files handed out that the pool has not taken
	// back: owned files minus clean, dirty and formatting.
	InUse int
	// Owned is every file the pool has created and not removed.
	Owned int
	// Target is the number of files the pool will own when formatting ends.
	Target int
	// FormatPercent is how far formatting towards Target has come (100 when
	// no formatting is pending).
	FormatPercent int
	// Limit says why the pool stopped growing ("" while it can grow).
	Limit string
	// Growable is how many more files the pool may still create on demand:
	// up to MaxChunks, and as many as the disk's free space above
	// ReserveBytes holds (0 while growth is stopped). Clean plus Growable is
	// what new data can still take.
	Growable int
	// ChunkSize and FileSize describe the files.
	ChunkSize, FileSize int64
}

// Pool is a directory of preformatted chunk files. It is safe for concurrent
// use.
type Pool struct {
	opts     Options
	geo      Geometry
	fileSize int64
	log      *slog.Logger
	zeros    []byte

	dir, cleanDir, dirtyDir, fmtDir string
	lockFd                          *os.File // holds the flock on Dir

	wake   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu struct {
		sync.Mutex
		clean   []string // clean/ names, handed out first in, first out
		dirty   []string // dirty/ names waiting for the zeroer
		failed  []string // dirty/ names whose zeroing failed; retried at next Open
		partial []string // formatting/ names found at Open, to be formatted again
		zeroing string   // dirty/ name being zeroed
		// formatting is the formatting/ name being written; fmtDone its bytes so far.
		formatting string
		fmtDone    int64
		owned      int
		target     int
		limit      string
		waiters    int
		// handouts are the times of the Gets of the last demandWindow,
		// oldest first (at most maxDemand): the pool keeps as many clean
		// files ready as were taken in that window.
		handouts   []time.Time
		recycleSeq uint64
		changed    chan struct{} // closed and replaced on every change
		closed     bool
		lastLogPct int
	}
}

// Open creates the pool directory or opens an existing one, checks its
// geometry against opts, and starts formatting in the background (redoing a
// file whose formatting was interrupted, zeroing files left dirty). It
// returns before formatting ends.
func Open(opts Options) (*Pool, error) {
	if opts.Dir == "" {
		return nil, fmt.Errorf("%w: empty pool directory", ErrInvalidOptions)
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = geometry.DefaultChunkSize
	}
	if opts.MetaPageSize == 0 {
		opts.MetaPageSize = geometry.DefaultMetaPageSize
	}
	if opts.BlockSize == 0 {
		opts.BlockSize = geometry.DefaultBlockSize
	}
	geo := Geometry{ChunkSize: opts.ChunkSize, MetaPageSize: opts.MetaPageSize, BlockSize: opts.BlockSize}
	if err := geo.Validate(); err != nil {
		return nil, err
	}
	if opts.InitialChunks < 0 || opts.MaxChunks < 0 || opts.ReserveBytes < 0 || opts.FormatBytesPerSec < 0 || opts.LowWater < 0 || opts.GrowBy < 0 {
		return nil, fmt.Errorf("%w: negative count or size", ErrInvalidOptions)
	}
	if opts.MaxChunks > 0 && opts.InitialChunks > opts.MaxChunks {
		return nil, fmt.Errorf("%w: InitialChunks %d above MaxChunks %d", ErrInvalidOptions, opts.InitialChunks, opts.MaxChunks)
	}
	if opts.LowWater == 0 {
		opts.LowWater = 4
	}
	if opts.GrowBy == 0 {
		opts.GrowBy = 2 * opts.LowWater
	}
	if opts.GetTimeout == 0 {
		opts.GetTimeout = defaultGetTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("chunkfilepool: %w", err)
	}
	p := &Pool{
		opts:     opts,
		geo:      geo,
		fileSize: geo.FileSize(),
		log:      opts.Logger.With("component", "chunkfilepool", "dir", dir),
		dir:      dir,
		cleanDir: filepath.Join(dir, cleanDirName),
		dirtyDir: filepath.Join(dir, dirtyDirName),
		fmtDir:   filepath.Join(dir, fmtDirName),
		zeros:    fsutil.AlignedBuffer(int(min(writeUnit, geo.FileSize()))),
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
	}
	p.mu.changed = make(chan struct{})
	p.mu.lastLogPct = -1
	if err := p.openDir(); err != nil {
		if p.lockFd != nil {
			_ = p.lockFd.Close()
		}
		return nil, err
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	st := p.statsLocked()
	p.log.Info("chunk file pool open", "geometry", geo.String(), "clean", st.Clean, "dirty", st.Dirty,
		"formatting", st.Formatting, "in_use", st.InUse, "target", st.Target)
	go p.run()
	p.kick()
	return p, nil
}

// Dir returns the pool directory (absolute).
func (p *Pool) Dir() string { return p.dir }

// Geometry returns the pool's file geometry.
func (p *Pool) Geometry() Geometry { return p.geo }

// FileSize is the size of every pool file: meta page plus chunk data.
func (p *Pool) FileSize() int64 { return p.fileSize }

// ChunkSize is the data size of a chunk.
func (p *Pool) ChunkSize() int64 { return p.geo.ChunkSize }

// MetaPageSize is the size of the meta page at the start of every file.
func (p *Pool) MetaPageSize() int64 { return p.geo.MetaPageSize }

// BlockSize is the IO granularity inside a chunk.
func (p *Pool) BlockSize() int64 { return p.geo.BlockSize }

// Demand-following growth: a burst of new chunks (a fresh volume's first
// writes touch a chunk per copyset) empties a pool that keeps only LowWater
// files ready, and the writes then wait for formatting. The pool therefore
// keeps as many clean files as were handed out in the last demandWindow,
// formatting ahead of the next burst off the write path.
const (
	demandWindow = 10 * time.Second
	// maxDemand bounds the hand-out times kept, and so how many files the
	// pool formats ahead of demand (4 GiB of 16 MiB chunks).
	maxDemand = 256
)

// noteHandoutLocked records a Get at now.
func (p *Pool) noteHandoutLocked(now time.Time) {
	h := p.mu.handouts
	cut := 0
	for cut < len(h) && now.Sub(h[cut]) > demandWindow {
		cut++
	}
	if len(h)-cut >= maxDemand {
		cut = len(h) - maxDemand + 1
	}
	p.mu.handouts = append(h[cut:], now)
}

// demandLocked is how many files were handed out in the last demandWindow.
func (p *Pool) demandLocked(now time.Time) int {
	n := 0
	for i := len(p.mu.handouts) - 1; i >= 0 && now.Sub(p.mu.handouts[i]) <= demandWindow; i-- {
		n++
	}
	return n
}

// Stats returns the pool's current accounting.
func (p *Pool) Stats() Stats {
	p.mu.Lock()
	s := p.statsLocked()
	p.mu.Unlock()
	s.Growable = p.growable(s)
	return s
}

// growable is how many more files the pool may create (Stats.Growable).
func (p *Pool) growable(s Stats) int {
	if s.Limit != "" {
		return 0
	}
	room := -1 // unbounded by MaxChunks
	if p.opts.MaxChunks > 0 {
		room = max(0, p.opts.MaxChunks-s.Owned)
	}
	if p.opts.TestingKnobs.SkipSpaceCheck {
		return max(room, 0)
	}
	free, err := fsutil.FreeBytes(p.dir)
	if err != nil {
		return 0
	}
	fits := max(0, (free-p.opts.ReserveBytes)/p.fileSize)
	if room < 0 || int64(room) > fits {
		return int(fits)
	}
	return room
}

func (p *Pool) statsLocked() Stats {
	s := Stats{
		Clean:     len(p.mu.clean),
		Dirty:     len(p.mu.dirty) + len(p.mu.failed),
		Owned:     p.mu.owned,
		Target:    max(p.mu.target, p.mu.owned),
		Limit:     p.mu.limit,
		ChunkSize: p.geo.ChunkSize,
		FileSize:  p.fileSize,
	}
	if p.mu.zeroing != "" {
		s.Dirty++
	}
	s.Formatting = len(p.mu.partial)
	if p.mu.formatting != "" {
		s.Formatting++
	}
	s.InUse = max(0, s.Owned-s.Clean-s.Dirty-s.Formatting)
	formatted := int64(s.Owned - s.Formatting)
	switch {
	case s.Formatting == 0 && s.Target <= s.Owned:
		s.FormatPercent = 100
	default:
		done := formatted*p.fileSize + p.mu.fmtDone
		total := int64(s.Target) * p.fileSize
		s.FormatPercent = int(min(99, done*100/total))
	}
	return s
}

// broadcastLocked wakes every Get waiting for a change.
func (p *Pool) broadcastLocked() {
	close(p.mu.changed)
	p.mu.changed = make(chan struct{})
}

// kick wakes the background worker.
func (p *Pool) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Get moves one clean file to dst; see GetContext. It waits at most
// Options.GetTimeout for the formatter.
func (p *Pool) Get(dst string) error {
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.GetTimeout)
	defer cancel()
	return p.GetContext(ctx, dst)
}

// GetContext atomically renames one clean, fully formatted file to dst and
// fsyncs both directories. dst must not exist (the error then wraps
// fs.ErrExist) and must be on the pool's filesystem. When no clean file is
// ready but the pool can still produce one (a dirty file being zeroed, a file
// being formatted, room to grow), it waits until one is ready or ctx ends;
// when it cannot, it returns an error wrapping ErrPoolEmpty at once. On any
// error no file has moved.
func (p *Pool) GetContext(ctx context.Context, dst string) error {
	lifted := false // a Get lifts a growth limit at most once
	p.mu.Lock()
	for {
		if p.mu.closed {
			p.mu.Unlock()
			return ErrClosed
		}
		if len(p.mu.clean) > 0 {
			name := p.mu.clean[0]
			p.mu.clean = p.mu.clean[1:]
			p.noteHandoutLocked(time.Now())
			p.kick() // the worker may want to grow
			p.mu.Unlock()
			if err := p.handOut(name, dst); err != nil {
				p.mu.Lock()
				p.mu.clean = append([]string{name}, p.mu.clean...)
				p.broadcastLocked()
				p.mu.Unlock()
				return err
			}
			return nil
		}
		if reason := p.cannotProduceLocked(&lifted); reason != "" {
			p.mu.Unlock()
			return fmt.Errorf("get chunk file for %s: %w: %s", dst, ErrPoolEmpty, reason)
		}
		ch := p.mu.changed
		p.mu.waiters++
		p.kick()
		p.mu.Unlock()
		var err error
		select {
		case <-ch:
		case <-ctx.Done():
			err = ctx.Err()
		}
		p.mu.Lock()
		p.mu.waiters--
		if err != nil {
			st := p.statsLocked()
			p.mu.Unlock()
			return fmt.Errorf("get chunk file for %s: %w: none formatted in time (formatting %d%%, %d dirty): %w",
				dst, ErrPoolEmpty, st.FormatPercent, st.Dirty, err)
		}
	}
}

// cannotProduceLocked returns why no clean file can appear, or "" when the
// worker is producing one or can. When growth was stopped (disk full, a
// format error) and *lifted is false, it checks the free space again and,
// when a file fits now, lets the worker try again and sets *lifted: a Get
// that then sees the attempt fail too gives up instead of retrying forever.
func (p *Pool) cannotProduceLocked(lifted *bool) string {
	if len(p.mu.dirty) > 0 || p.mu.zeroing != "" || p.mu.formatting != "" {
		return ""
	}
	if p.mu.limit != "" {
		if *lifted {
			return p.mu.limit
		}
		if reason := p.spaceShortage(); reason != "" {
			return reason
		}
		p.log.Info("chunk file pool tries to grow again", "was", p.mu.limit)
		p.mu.limit = ""
		*lifted = true
	}
	if len(p.mu.partial) > 0 {
		return ""
	}
	if p.opts.MaxChunks > 0 && p.mu.owned >= p.opts.MaxChunks {
		return fmt.Sprintf("the pool holds its maximum of %d files, all in use", p.opts.MaxChunks)
	}
	return ""
}

// spaceShortage returns why one more file would not fit, or "".
func (p *Pool) spaceShortage() string {
	if p.opts.TestingKnobs.SkipSpaceCheck {
		return ""
	}
	free, err := fsutil.FreeBytes(p.dir)
	if err != nil {
		return err.Error()
	}
	if free < p.fileSize+p.opts.ReserveBytes {
		return fmt.Sprintf("disk full: %d bytes free, a file needs %d and %d are reserved", free, p.fileSize, p.opts.ReserveBytes)
	}
	return ""
}

// handOut moves clean/name to dst durably. On error the file is back in
// clean/ (or, if even that rename fails, left at dst and logged).
func (p *Pool) handOut(name, dst string) error {
	src := filepath.Join(p.cleanDir, name)
	if err := fsutil.RenameNoReplace(src, dst); err != nil {
		return fmt.Errorf("get chunk file for %s: %w", dst, err)
	}
	err := fsutil.SyncDir(filepath.Dir(dst))
	if err == nil {
		err = fsutil.SyncDir(p.cleanDir)
	}
	if err != nil {
		if rerr := fsutil.RenameNoReplace(dst, src); rerr != nil {
			p.log.Error("cannot take back a file whose hand-out failed", "file", dst, "err", rerr)
		}
		return fmt.Errorf("get chunk file for %s: %w", dst, err)
	}
	return nil
}

// Recycle takes back a file handed out by Get (a chunk or a WAL segment): it
// is renamed into the dirty list (both directories fsynced) and zeroed in the
// background before it is handed out again. The caller must have closed
// every descriptor it writes through. A file that is not a regular file is
// refused and left in place.
func (p *Pool) Recycle(path string) error {
	info, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("recycle: %w", err)
	}
	if !info.Mode().IsRegular() {
		return fmt.Errorf("recycle %s: not a regular file", path)
	}
	p.mu.Lock()
	if p.mu.closed {
		p.mu.Unlock()
		return ErrClosed
	}
	name := recycledPrefix + strconv.FormatUint(p.mu.recycleSeq, 10)
	p.mu.recycleSeq++
	p.mu.Unlock()
	if err := fsutil.RenameNoReplace(path, filepath.Join(p.dirtyDir, name)); err != nil {
		return fmt.Errorf("recycle: %w", err)
	}
	// The file is in dirty/ now, whether or not the fsyncs below succeed:
	// zero it either way.
	p.mu.Lock()
	p.mu.dirty = append(p.mu.dirty, name)
	p.broadcastLocked()
	p.mu.Unlock()
	p.kick()
	if err := fsutil.SyncDir(p.dirtyDir); err != nil {
		return fmt.Errorf("recycle %s: %w", path, err)
	}
	if err := fsutil.SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("recycle %s: %w", path, err)
	}
	return nil
}

// Close stops the background work and releases the directory. A file being
// formatted stays in formatting/ and is formatted again by the next Open; a
// file being zeroed stays dirty. Waiting Gets fail with ErrClosed.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.mu.closed {
		p.mu.Unlock()
		return nil
	}
	p.mu.closed = true
	p.broadcastLocked()
	p.mu.Unlock()
	p.cancel()
	<-p.done
	p.log.Info("chunk file pool closed")
	return p.lockFd.Close()
}
