package datastore

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/internal/geometry"
)

const (
	chunkPrefix    = "chunk_"
	creatingSuffix = ".creating"
)

// Options configure a Store.
type Options struct {
	// Logger receives the store's logs. Default: discard.
	Logger *slog.Logger
	// Files is the descriptor cache, normally shared by every store of a
	// chunkserver. Nil gives the store a private cache of FDCacheSize.
	Files *FileCache
	// FDCacheSize bounds the private cache made when Files is nil.
	// Default: 64.
	FDCacheSize int
	// CreateWait bounds how long creating a chunk waits for the pool to
	// finish formatting a file when none is ready (default 50ms). The
	// copyset applies writes on shared workers: a write that finds no file
	// fails with an error wrapping chunkfilepool.ErrPoolEmpty and is
	// retried later, instead of holding a worker for the formatter.
	CreateWait time.Duration
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// TestingKnobs let tests observe or fail steps that are otherwise invisible.
type TestingKnobs struct {
	// BeforeFdatasync is called by Sync just before it fdatasyncs a chunk,
	// with the chunk held from reads and writes.
	BeforeFdatasync func(chunkID uint64)
	// BeforeCreateRename is called when a new chunk's meta page is durable,
	// before the file is renamed to its final name. A returned error fails
	// the creation there.
	BeforeCreateRename func(chunkID uint64) error
	// AfterRecycle is called when Delete has handed a chunk's file back to
	// the pool; a returned error stands for a failure after the file moved
	// (a directory fsync).
	AfterRecycle func(chunkID uint64) error
}

// ChunkInfo describes a chunk.
type ChunkInfo struct {
	ID uint64
	// Size is the chunk's data size (the pool's chunk size).
	Size int64
	// SN is the volume sequence number the chunk's data is at, as far as
	// the store knows (a lower bound after a restart: a move to a newer
	// number that kept no version is not written down); CreatedSN the one
	// it was created under (snapshot.go).
	SN, CreatedSN uint64
	// Versions are the chunk's version files, oldest first.
	Versions []VersionInfo
	// Version is the meta page format version.
	Version uint32
	// Clone is set for a clone's chunk (clone.go), which owns OwnedPages
	// pages of CopyUnit bytes.
	Clone      bool
	OwnedPages int
}

// VersionInfo describes a chunk's version file: the pages it holds of the
// chunk as it was at the end of the sequence numbers From..To.
type VersionInfo struct {
	From, To uint64
	// Pages is how many pages of CopyUnit bytes it holds.
	Pages    int
	CopyUnit int64
}

// chunk is a chunk file of the store. IO holds mu for reading; Delete and
// Close hold it for writing, so that a file is never recycled while an IO
// uses it.
type chunk struct {
	id      uint64
	path    string
	meta    ChunkMeta
	corrupt error // non-nil: the meta page did not check out
	dirty   atomic.Bool

	mu   sync.RWMutex
	gone error // ErrChunkNotExist after Delete, ErrClosed after Close; guarded by mu

	// data orders reads of the chunk's data against writes into it: a
	// read sees a write whole or not at all (the page cache copies a
	// write in page by page, and a read copying out meanwhile would see
	// part of it).
	data sync.RWMutex

	// cow orders sequenced writes, trims and snapshot reads of the chunk
	// (snapshot.go); it guards sn and versions.
	cow      sync.RWMutex
	sn       uint64     // sequence number of the data
	versions []*version // by From, ascending

	// own is what a clone's chunk owns (clone.go); nil for other chunks.
	own *owned

	// Guarded by the FileCache's mutex.
	h          *handle
	prev, next *chunk
}

type creation struct {
	done chan struct{}
	err  error
}

// Store holds the chunks of one copyset in one directory.
type Store struct {
	dir      string
	pool     *chunkfilepool.Pool
	geo      chunkfilepool.Geometry
	log      *slog.Logger
	files    *FileCache
	knobs    TestingKnobs
	wait     time.Duration // CreateWait
	lockFd   *os.File
	hashBufs sync.Pool
	unit     int64 // copy unit of version files

	mu struct {
		sync.RWMutex
		chunks   map[uint64]*chunk
		creating map[uint64]*creation
		closed   bool
	}
}

// Open opens the store in dir, creating the directory when missing. Chunk
// geometry comes from pool, which must be on the same filesystem. Files left
// by an interrupted chunk creation go back to the pool; chunks whose meta
// page does not check out are listed and reported as corrupt.
func Open(dir string, pool *chunkfilepool.Pool, opts Options) (*Store, error) {
	if pool == nil {
		return nil, errors.New("datastore: open: nil chunk file pool")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.CreateWait <= 0 {
		opts.CreateWait = 50 * time.Millisecond
	}
	if opts.Files == nil {
		if opts.FDCacheSize <= 0 {
			opts.FDCacheSize = 64
		}
		opts.Files = NewFileCache(opts.FDCacheSize)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("datastore: open: %w", err)
	}
	s := &Store{
		dir:   dir,
		pool:  pool,
		geo:   pool.Geometry(),
		log:   opts.Logger.With("component", "datastore", "dir", dir),
		files: opts.Files,
		knobs: opts.TestingKnobs,
		wait:  opts.CreateWait,
	}
	s.unit = geometry.CopyUnit(s.geo.ChunkSize, s.geo.MetaPageSize, s.geo.BlockSize)
	s.hashBufs.New = func() any { b := make([]byte, 256<<10); return &b }
	s.mu.chunks = make(map[uint64]*chunk)
	s.mu.creating = make(map[uint64]*creation)
	if err := s.load(); err != nil {
		if s.lockFd != nil {
			_ = s.lockFd.Close()
		}
		return nil, err
	}
	return s, nil
}

func (s *Store) load() error {
	if _, err := os.Stat(s.dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(s.dir, 0o755); err != nil {
			return fmt.Errorf("datastore: open: %w", err)
		}
		if err := fsutil.SyncDir(filepath.Dir(s.dir)); err != nil {
			return fmt.Errorf("datastore: open: %w", err)
		}
	}
	lock, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("datastore: open: %w", err)
	}
	s.lockFd = lock
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("%w: %s", ErrLocked, s.dir)
		}
		return fmt.Errorf("datastore: lock %s: %w", s.dir, err)
	}
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("datastore: open: %w", err)
	}
	page := make([]byte, s.geo.MetaPageSize)
	corrupt := 0
	versions := map[uint64][]*version{}
	ownFiles := map[uint64]string{}
	for _, e := range ents {
		name := e.Name()
		path := filepath.Join(s.dir, name)
		if !e.Type().IsRegular() {
			s.log.Warn("ignoring unexpected entry in store directory", "name", name)
			continue
		}
		if strings.HasSuffix(name, creatingSuffix) {
			// Creation did not finish, so no write into it was acknowledged.
			s.log.Info("returning an unfinished chunk creation to the pool", "file", name)
			if err := s.pool.Recycle(path); err != nil {
				return fmt.Errorf("datastore: open: %w", err)
			}
			continue
		}
		if id, from, ok := parseVersionName(name); ok {
			v := &version{path: path}
			v.meta, v.corrupt = s.readVersionMeta(id, from, path, page)
			if v.corrupt != nil {
				s.log.Error("version file of a chunk is corrupt; snapshots that read it fail", "chunk", id, "file", name, "err", v.corrupt)
				v.meta = versionMeta{ChunkID: id, From: from, To: from, Unit: s.unit, Bitmap: make([]byte, s.bitmapLen())}
			}
			versions[id] = append(versions[id], v)
			continue
		}
		if id, ok := parseOwnName(name); ok {
			ownFiles[id] = path
			continue
		}
		id, ok := parseChunkName(name)
		if !ok {
			s.log.Warn("ignoring unexpected file in store directory", "name", name)
			continue
		}
		c := &chunk{id: id, path: path}
		c.meta, c.corrupt = s.readMeta(id, path, page)
		if c.corrupt != nil {
			corrupt++
			s.log.Error("chunk is corrupt; it will not be served", "chunk", id, "err", c.corrupt)
		}
		s.mu.chunks[id] = c
	}
	if err := s.attachVersions(versions); err != nil {
		return err
	}
	if err := s.attachOwned(ownFiles); err != nil {
		return err
	}
	// One per copyset: the engine logs the sum.
	s.log.Debug("chunk store open", "chunks", len(s.mu.chunks), "corrupt", corrupt)
	return nil
}

func parseChunkName(name string) (uint64, bool) {
	digits, ok := strings.CutPrefix(name, chunkPrefix)
	if !ok {
		return 0, false
	}
	id, err := strconv.ParseUint(digits, 10, 64)
	if err != nil || chunkName(id) != name {
		return 0, false
	}
	return id, true
}

func chunkName(id uint64) string { return chunkPrefix + strconv.FormatUint(id, 10) }

// readMeta reads and checks the meta page of chunk id. A returned error
// wraps ErrCorrupt when the file is damaged.
func (s *Store) readMeta(id uint64, path string, page []byte) (ChunkMeta, error) {
	f, err := os.Open(path)
	if err != nil {
		return ChunkMeta{}, fmt.Errorf("chunk %d: %w", id, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ChunkMeta{}, fmt.Errorf("chunk %d: %w", id, err)
	}
	if fi.Size() != s.geo.FileSize() {
		return ChunkMeta{}, fmt.Errorf("%w: chunk %d: file is %d bytes, want %d", ErrCorrupt, id, fi.Size(), s.geo.FileSize())
	}
	if _, err := f.ReadAt(page, 0); err != nil {
		return ChunkMeta{}, fmt.Errorf("chunk %d: read meta page: %w", id, err)
	}
	m, err := DecodeMetaPage(page)
	if err != nil {
		return ChunkMeta{}, fmt.Errorf("chunk %d: %w", id, err)
	}
	if m.ChunkID != id {
		return ChunkMeta{}, fmt.Errorf("%w: chunk %d: meta page names chunk %d", ErrCorrupt, id, m.ChunkID)
	}
	if m.ChunkSize != s.geo.ChunkSize {
		return ChunkMeta{}, fmt.Errorf("%w: chunk %d: meta page chunk size %d, pool's is %d", ErrCorrupt, id, m.ChunkSize, s.geo.ChunkSize)
	}
	return m, nil
}

// Dir returns the store's directory (absolute).
func (s *Store) Dir() string { return s.dir }

// ChunkSize is the data size of every chunk.
func (s *Store) ChunkSize() int64 { return s.geo.ChunkSize }

// BlockSize is the IO granularity.
func (s *Store) BlockSize() int64 { return s.geo.BlockSize }

func (s *Store) checkRange(n int, off int64) error {
	bs := s.geo.BlockSize
	l := int64(n)
	if l == 0 || off < 0 || off%bs != 0 || l%bs != 0 || off > s.geo.ChunkSize-l {
		return fmt.Errorf("%w: offset %d length %d (block %d, chunk %d)", ErrInvalidRange, off, l, bs, s.geo.ChunkSize)
	}
	return nil
}

// lookup returns the chunk or nil.
func (s *Store) lookup(id uint64) (*chunk, error) {
	s.mu.RLock()
	c, closed := s.mu.chunks[id], s.mu.closed
	s.mu.RUnlock()
	if closed {
		return nil, ErrClosed
	}
	return c, nil
}
