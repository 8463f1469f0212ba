package datastore

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
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
	// Knobs are hooks for tests; zero in production.
	Knobs TestingKnobs
}

// TestingKnobs let tests observe or fail steps that are otherwise invisible.
type TestingKnobs struct {
	// BeforeFdatasync is called by Sync just before it fdatasyncs a chunk.
	BeforeFdatasync func(chunkID uint64)
	// BeforeCreateRename is called when a new chunk's meta page is durable,
	// before the file is renamed to its final name. A returned error fails
	// the creation there.
	BeforeCreateRename func(chunkID uint64) error
}

// ChunkInfo describes a chunk.
type ChunkInfo struct {
	ID uint64
	// Size is the chunk's data size (the pool's chunk size).
	Size int64
	// SN and CorrectedSN are the sequence numbers kept for snapshots.
	SN, CorrectedSN uint64
	// Version is the meta page format version.
	Version uint32
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
	lockFd   *os.File
	hashBufs sync.Pool

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
		knobs: opts.Knobs,
	}
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
	s.log.Info("chunk store open", "chunks", len(s.mu.chunks), "corrupt", corrupt)
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

// WriteAt writes p at off into the chunk's data, creating the chunk on its
// first write. off and len(p) must be multiples of the block size inside the
// chunk (ErrInvalidRange). The data is not fsynced: see Sync. When a new
// chunk needs a file and the pool has none, the error wraps ErrNoSpace and
// nothing is created.
func (s *Store) WriteAt(id uint64, p []byte, off int64) error {
	if err := s.checkRange(len(p), off); err != nil {
		return fmt.Errorf("write chunk %d: %w", id, err)
	}
	for {
		c, err := s.lookup(id)
		if err != nil {
			return err
		}
		if c == nil {
			if c, err = s.create(id); err != nil {
				return err
			}
		}
		retry, err := s.writeChunk(c, p, off)
		if !retry {
			return err
		}
		// Deleted between lookup and write: the write creates it anew.
	}
}

func (s *Store) writeChunk(c *chunk, p []byte, off int64) (retry bool, err error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return c.gone == ErrChunkNotExist, c.gone
	}
	if c.corrupt != nil {
		return false, fmt.Errorf("write: %w", c.corrupt)
	}
	h, err := s.files.acquire(c)
	if err != nil {
		return false, fmt.Errorf("write: %w", err)
	}
	_, err = h.f.WriteAt(p, s.geo.MetaPageSize+off)
	h.release()
	if err != nil {
		return false, fmt.Errorf("write chunk %d: %w", c.id, err)
	}
	c.dirty.Store(true)
	return false, nil
}

// create makes chunk id from a pool file, or waits for a creation of the same
// chunk under way.
func (s *Store) create(id uint64) (*chunk, error) {
	for {
		s.mu.Lock()
		if s.mu.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		if c := s.mu.chunks[id]; c != nil {
			s.mu.Unlock()
			return c, nil
		}
		cr := s.mu.creating[id]
		if cr == nil {
			break
		}
		s.mu.Unlock()
		<-cr.done
		if cr.err != nil {
			return nil, cr.err
		}
	}
	cr := &creation{done: make(chan struct{})}
	s.mu.creating[id] = cr
	s.mu.Unlock()

	c, err := s.createFile(id)

	s.mu.Lock()
	delete(s.mu.creating, id)
	if err == nil && s.mu.closed {
		// Closed meanwhile: the chunk exists on disk (all zeros) and is
		// found at the next Open; no write into it was acknowledged.
		s.files.remove(c)
		err = ErrClosed
	}
	if err == nil {
		s.mu.chunks[id] = c
	}
	cr.err = err
	close(cr.done)
	s.mu.Unlock()
	return c, err
}

// createFile takes a pool file under a temporary name, writes and
// fdatasyncs the meta page, renames the file to its final name and fsyncs
// the directory. On failure the file goes back to the pool.
func (s *Store) createFile(id uint64) (*chunk, error) {
	final := filepath.Join(s.dir, chunkName(id))
	tmp := final + creatingSuffix
	if err := s.pool.Get(tmp); err != nil {
		if errors.Is(err, chunkfilepool.ErrPoolEmpty) {
			return nil, fmt.Errorf("create chunk %d: %w: %w", id, ErrNoSpace, err)
		}
		return nil, fmt.Errorf("create chunk %d: %w", id, err)
	}
	current := tmp
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err == nil {
		err = func() error {
			meta := ChunkMeta{Version: MetaVersion, ChunkID: id, ChunkSize: s.geo.ChunkSize}
			if _, err := f.WriteAt(EncodeMetaPage(meta, int(s.geo.MetaPageSize)), 0); err != nil {
				return err
			}
			if err := unix.Fdatasync(int(f.Fd())); err != nil {
				return fmt.Errorf("fdatasync: %w", err)
			}
			if hook := s.knobs.BeforeCreateRename; hook != nil {
				if err := hook(id); err != nil {
					return err
				}
			}
			if err := fsutil.RenameNoReplace(tmp, final); err != nil {
				return err
			}
			current = final
			return fsutil.SyncDir(s.dir)
		}()
		if err != nil {
			_ = f.Close()
		}
	}
	if err != nil {
		if rerr := s.pool.Recycle(current); rerr != nil {
			s.log.Error("cannot return a file of a failed chunk creation to the pool", "file", current, "err", rerr)
		}
		return nil, fmt.Errorf("create chunk %d: %w", id, err)
	}
	c := &chunk{
		id:   id,
		path: final,
		meta: ChunkMeta{Version: MetaVersion, ChunkID: id, ChunkSize: s.geo.ChunkSize},
	}
	s.files.insert(c, f).release()
	return c, nil
}

// ReadAt reads len(p) bytes at off of the chunk's data. off and len(p) must
// be multiples of the block size inside the chunk. A missing chunk gives
// ErrChunkNotExist; never-written ranges of an existing chunk read as zeros.
func (s *Store) ReadAt(id uint64, p []byte, off int64) error {
	if err := s.checkRange(len(p), off); err != nil {
		return fmt.Errorf("read chunk %d: %w", id, err)
	}
	c, err := s.lookup(id)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("read chunk %d: %w", id, ErrChunkNotExist)
	}
	return s.readChunk(c, p, off)
}

func (s *Store) readChunk(c *chunk, p []byte, off int64) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return fmt.Errorf("read chunk %d: %w", c.id, c.gone)
	}
	if c.corrupt != nil {
		return fmt.Errorf("read: %w", c.corrupt)
	}
	h, err := s.files.acquire(c)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	_, err = h.f.ReadAt(p, s.geo.MetaPageSize+off)
	h.release()
	if err != nil {
		return fmt.Errorf("read chunk %d: %w", c.id, err)
	}
	return nil
}

// Delete removes the chunk and returns its file to the pool, which zeroes it
// before reuse. Deleting a missing chunk succeeds. Corrupt chunks can be
// deleted.
func (s *Store) Delete(id uint64) error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	c := s.mu.chunks[id]
	delete(s.mu.chunks, id)
	s.mu.Unlock()
	if c == nil {
		return nil
	}
	c.mu.Lock()
	c.gone = ErrChunkNotExist
	s.files.remove(c)
	c.mu.Unlock()
	if err := s.pool.Recycle(c.path); err != nil {
		// The file is still in place: keep the chunk.
		back := &chunk{id: id, path: c.path, meta: c.meta, corrupt: c.corrupt}
		back.dirty.Store(c.dirty.Load())
		s.mu.Lock()
		if s.mu.chunks[id] == nil && !s.mu.closed {
			s.mu.chunks[id] = back
		}
		s.mu.Unlock()
		return fmt.Errorf("delete chunk %d: %w", id, err)
	}
	return nil
}

// Info returns the chunk's metadata: ErrChunkNotExist for a missing chunk,
// ErrCorrupt for one whose meta page does not check out.
func (s *Store) Info(id uint64) (ChunkInfo, error) {
	c, err := s.lookup(id)
	if err != nil {
		return ChunkInfo{}, err
	}
	if c == nil {
		return ChunkInfo{}, fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	if c.corrupt != nil {
		return ChunkInfo{}, c.corrupt
	}
	return ChunkInfo{ID: id, Size: s.geo.ChunkSize, SN: c.meta.SN, CorrectedSN: c.meta.CorrectedSN, Version: c.meta.Version}, nil
}

// Hash returns the CRC32C (Castagnoli) of length bytes at off of the chunk's
// data; length 0 means to the end of the chunk. The range follows ReadAt's
// rules.
func (s *Store) Hash(id uint64, off, length int64) (uint32, error) {
	if length == 0 {
		length = s.geo.ChunkSize - off
	}
	if length < 0 || length > s.geo.ChunkSize {
		return 0, fmt.Errorf("hash chunk %d: %w: offset %d length %d", id, ErrInvalidRange, off, length)
	}
	if err := s.checkRange(int(length), off); err != nil {
		return 0, fmt.Errorf("hash chunk %d: %w", id, err)
	}
	c, err := s.lookup(id)
	if err != nil {
		return 0, err
	}
	if c == nil {
		return 0, fmt.Errorf("hash chunk %d: %w", id, ErrChunkNotExist)
	}
	bp := s.hashBufs.Get().(*[]byte)
	defer s.hashBufs.Put(bp)
	buf := *bp
	var crc uint32
	for done := int64(0); done < length; {
		n := min(int64(len(buf)), length-done)
		if err := s.readChunk(c, buf[:n], off+done); err != nil {
			return 0, err
		}
		crc = crc32.Update(crc, castagnoli, buf[:n])
		done += n
	}
	return crc, nil
}

// List returns the ids of every chunk in the store, corrupt ones included,
// in ascending order.
func (s *Store) List() []uint64 {
	s.mu.RLock()
	ids := make([]uint64, 0, len(s.mu.chunks))
	for id := range s.mu.chunks {
		ids = append(ids, id)
	}
	s.mu.RUnlock()
	slices.Sort(ids)
	return ids
}

// Sync fdatasyncs every chunk written since the previous Sync. A write that
// completed before Sync was called is durable when Sync returns nil; writes
// running concurrently may or may not be included. On error the failed
// chunks stay marked for the next Sync, but the caller must not assume
// their data is on disk (after a failed fdatasync the kernel may have
// dropped the dirty pages): treat it as a disk failure.
func (s *Store) Sync() error {
	s.mu.RLock()
	if s.mu.closed {
		s.mu.RUnlock()
		return ErrClosed
	}
	var todo []*chunk
	for _, c := range s.mu.chunks {
		if c.dirty.Load() {
			todo = append(todo, c)
		}
	}
	s.mu.RUnlock()
	var errs []error
	for _, c := range todo {
		if err := s.syncChunk(c); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (s *Store) syncChunk(c *chunk) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return nil // deleted: nothing of it needs to survive
	}
	// Clear the mark before the fdatasync: a write finishing after this
	// point either is covered by the fdatasync or marks the chunk again.
	if !c.dirty.Swap(false) {
		return nil
	}
	h, err := s.files.acquire(c)
	if err != nil {
		c.dirty.Store(true)
		return fmt.Errorf("sync: %w", err)
	}
	if hook := s.knobs.BeforeFdatasync; hook != nil {
		hook(c.id)
	}
	err = unix.Fdatasync(h.fd)
	h.release()
	if err != nil {
		c.dirty.Store(true)
		return fmt.Errorf("sync chunk %d: fdatasync: %w", c.id, err)
	}
	return nil
}

// ChunkReader reads one chunk's data, for streaming it to another replica
// (Raft snapshot transfer). It holds no descriptor between calls; a ReadAt
// after the chunk was deleted fails with ErrChunkNotExist.
type ChunkReader struct {
	s    *Store
	c    *chunk
	size int64
}

var _ io.ReaderAt = (*ChunkReader)(nil)

// OpenChunk returns a reader over the chunk's data.
func (s *Store) OpenChunk(id uint64) (*ChunkReader, error) {
	c, err := s.lookup(id)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("open chunk %d: %w", id, ErrChunkNotExist)
	}
	if c.corrupt != nil {
		return nil, c.corrupt
	}
	return &ChunkReader{s: s, c: c, size: s.geo.ChunkSize}, nil
}

// ID is the chunk's id.
func (r *ChunkReader) ID() uint64 { return r.c.id }

// Size is the chunk's data size.
func (r *ChunkReader) Size() int64 { return r.size }

// ReadAt implements io.ReaderAt over the chunk's data; offsets need no
// alignment.
func (r *ChunkReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read chunk %d: %w: negative offset", r.c.id, ErrInvalidRange)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	want := len(p)
	if rest := r.size - off; int64(want) > rest {
		want = int(rest)
	}
	c := r.c
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return 0, fmt.Errorf("read chunk %d: %w", c.id, c.gone)
	}
	h, err := r.s.files.acquire(c)
	if err != nil {
		return 0, fmt.Errorf("read: %w", err)
	}
	n, err := h.f.ReadAt(p[:want], r.s.geo.MetaPageSize+off)
	h.release()
	if err != nil {
		return n, fmt.Errorf("read chunk %d: %w", c.id, err)
	}
	if want < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Close releases the reader.
func (r *ChunkReader) Close() error { return nil }

// Close syncs written chunks (see Sync), closes their descriptors and
// releases the directory. Later calls return ErrClosed.
func (s *Store) Close() error {
	err := s.Sync()
	if errors.Is(err, ErrClosed) {
		return nil
	}
	s.shut(ErrClosed)
	if cerr := s.lockFd.Close(); err == nil {
		err = cerr
	}
	return err
}

// shut marks the store closed and closes every descriptor; it returns the
// chunks it held.
func (s *Store) shut(gone error) []*chunk {
	s.mu.Lock()
	s.mu.closed = true
	chunks := make([]*chunk, 0, len(s.mu.chunks))
	for _, c := range s.mu.chunks {
		chunks = append(chunks, c)
	}
	s.mu.chunks = map[uint64]*chunk{}
	s.mu.Unlock()
	for _, c := range chunks {
		c.mu.Lock()
		c.gone = gone
		s.files.remove(c)
		c.mu.Unlock()
	}
	return chunks
}

// Destroy returns every chunk file to the pool and removes the store
// directory (the copyset left this chunkserver). It stops at the first file
// the pool refuses, leaving the rest in place for a later Destroy.
func (s *Store) Destroy() error {
	s.mu.RLock()
	closed := s.mu.closed
	s.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	s.shut(ErrChunkNotExist)
	defer s.lockFd.Close()
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("destroy store %s: %w", s.dir, err)
	}
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() {
			continue
		}
		if _, ok := parseChunkName(name); !ok && !strings.HasSuffix(name, creatingSuffix) {
			continue
		}
		if err := s.pool.Recycle(filepath.Join(s.dir, name)); err != nil {
			return fmt.Errorf("destroy store %s: %w", s.dir, err)
		}
	}
	if err := os.RemoveAll(s.dir); err != nil {
		return fmt.Errorf("destroy store %s: %w", s.dir, err)
	}
	if err := fsutil.SyncDir(filepath.Dir(s.dir)); err != nil {
		return fmt.Errorf("destroy store %s: %w", s.dir, err)
	}
	s.log.Info("chunk store destroyed")
	return nil
}
