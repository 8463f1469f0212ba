package datastore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
)

// Snapshots, copy on write by sequence number. A volume's writes carry its
// sequence number (sn); taking a snapshot records the current one and moves
// the volume to the next. A chunk's data is at the sequence number of the
// last write that moved it on (its sn, never written down: it is the
// chunk's CreatedSN or one past the To of its newest version file). The
// first write under a newer sn than the chunk's cuts: if a live snapshot
// may still read the chunk as it is (keep, the newest live snapshot's
// sequence number, is at least the chunk's CreatedSN), the chunk's current
// state is kept in a version file, [chunk sn, write sn - 1], or the newest
// version is extended to it when no live snapshot falls in between. From
// then on every write of that sn first copies the pages it overwrites that
// the version does not hold yet into the version (copy on write).
//
// Reading a snapshot taken at sequence number s reads, page by page, the
// oldest version with To >= s that holds the page, else the chunk's current
// data; a chunk created after s reads as zeros.
//
// Crash safety without a write-ahead of the old data: the copied pages are
// fdatasynced, then the version's bitmap (in one of its two meta slots),
// then the overwrite is issued. Replaying a write after a crash copies again
// only pages whose bit is not durable, and those were not overwritten yet.
// A replayed write older than the chunk's sn writes without copying: the
// pages it overwrites that a later write of the log copied hold its data in
// the version already. The decision to keep a version depends only on the
// write and on what is on disk, so every replica makes the same.

// ErrNoSnapshot is returned by ReadAtSN for sequence number 0, which names
// no snapshot.
var ErrNoSnapshot = errors.New("datastore: sequence number 0 names no snapshot")

// version is a version file of a chunk.
type version struct {
	path    string
	meta    versionMeta
	corrupt error
}

// bitmapLen is the size of a version bitmap: a bit per page of the copy
// unit.
func (s *Store) bitmapLen() int {
	pages := (s.geo.ChunkSize + s.unit - 1) / s.unit
	return int((pages + 7) / 8)
}

// readVersionMeta reads and checks a version file's meta page.
func (s *Store) readVersionMeta(id, from uint64, path string, page []byte) (versionMeta, error) {
	f, err := os.Open(path)
	if err != nil {
		return versionMeta{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return versionMeta{}, err
	}
	if fi.Size() != s.geo.FileSize() {
		return versionMeta{}, fmt.Errorf("%w: file is %d bytes, want %d", ErrCorrupt, fi.Size(), s.geo.FileSize())
	}
	if _, err := f.ReadAt(page, 0); err != nil {
		return versionMeta{}, fmt.Errorf("read meta page: %w", err)
	}
	m, err := decodeVersionPage(page, s.bitmapLen())
	if err != nil {
		return versionMeta{}, err
	}
	if m.ChunkID != id || m.From != from || m.ChunkSize != s.geo.ChunkSize || m.Unit != s.unit {
		return versionMeta{}, fmt.Errorf("%w: meta of chunk %d from %d (size %d, unit %d) in the file of chunk %d from %d",
			ErrCorrupt, m.ChunkID, m.From, m.ChunkSize, m.Unit, id, from)
	}
	return m, nil
}

// attachVersions gives loaded chunks their versions and their sn; a version
// without its chunk (a delete interrupted) goes back to the pool.
func (s *Store) attachVersions(versions map[uint64][]*version) error {
	for _, c := range s.mu.chunks {
		c.sn = max(c.meta.CreatedSN, 1) // sequence numbers start at 1
	}
	for id, vs := range versions {
		c := s.mu.chunks[id]
		if c == nil {
			for _, v := range vs {
				s.log.Info("returning the version file of a deleted chunk to the pool", "file", filepath.Base(v.path))
				if err := s.pool.Recycle(v.path); err != nil {
					return fmt.Errorf("datastore: open: %w", err)
				}
			}
			continue
		}
		slices.SortFunc(vs, func(a, b *version) int { return compareU64(a.meta.From, b.meta.From) })
		var kept []*version
		for _, v := range vs {
			if n := len(kept); n > 0 && kept[n-1].corrupt == nil && v.corrupt == nil && kept[n-1].meta.To >= v.meta.To {
				// A merge into the version before finished; recycling
				// this one did not.
				s.log.Info("returning a version merged into the one before it to the pool", "file", filepath.Base(v.path))
				if err := s.pool.Recycle(v.path); err != nil {
					return fmt.Errorf("datastore: open: %w", err)
				}
				continue
			}
			kept = append(kept, v)
		}
		vs = kept
		c.versions = vs
		c.sn = max(c.sn, vs[len(vs)-1].meta.To+1)
	}
	return nil
}

func compareU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// WriteAtSN writes p at off like WriteAt, as a write of a volume at
// sequence number sn (0: a write outside snapshots, as WriteAt); keep is the
// sequence number of the volume's newest live snapshot (0: none). It keeps
// what the volume's snapshots need of the chunk's current data before it
// overwrites it (see above); a new chunk is created under sn.
func (s *Store) WriteAtSN(id uint64, p []byte, off int64, sn, keep uint64) error {
	return s.write(id, p, off, sn, keep)
}

// cut moves the chunk on to sn when sn is newer, keeping a version when a
// live snapshot needs one, and returns the version the write copies into
// (nil: none). c.cow held.
func (s *Store) cut(c *chunk, sn, keep uint64) (*version, error) {
	if sn > c.sn {
		var last *version
		if n := len(c.versions); n > 0 {
			last = c.versions[n-1]
		}
		needed := keep != 0 && keep >= c.meta.CreatedSN
		switch {
		case !needed:
		case keep < c.sn && last != nil && last.corrupt == nil && last.meta.To == c.sn-1:
			// No live snapshot between: the newest version stands for
			// the gap too (its pages did not change in it).
			m := last.meta.clone()
			m.To = sn - 1
			if err := s.writeVersionMeta(last, m); err != nil {
				return nil, err
			}
		default:
			v, err := s.createVersion(c.id, c.sn, sn-1, s.notOwned(c))
			if err != nil {
				return nil, err
			}
			c.versions = append(c.versions, v)
		}
		c.sn = sn
	}
	if n := len(c.versions); n > 0 && c.versions[n-1].meta.To == c.sn-1 && sn == c.sn {
		v := c.versions[n-1]
		if v.corrupt != nil {
			return nil, v.corrupt
		}
		return v, nil
	}
	return nil, nil
}

// createVersion makes the version file of chunk id for from..to, durable
// and empty, from a pool file; absent marks the pages a clone's chunk did
// not own (nil: none).
func (s *Store) createVersion(id, from, to uint64, absent []byte) (*version, error) {
	final := filepath.Join(s.dir, versionName(id, from))
	tmp := final + creatingSuffix
	ctx, cancel := context.WithTimeout(context.Background(), s.wait)
	err := s.pool.GetContext(ctx, tmp)
	cancel()
	if err != nil {
		if errors.Is(err, chunkfilepool.ErrPoolEmpty) {
			return nil, fmt.Errorf("keep version %d..%d: %w: %w", from, to, ErrNoSpace, err)
		}
		return nil, fmt.Errorf("keep version %d..%d: %w", from, to, err)
	}
	m := versionMeta{ChunkID: id, From: from, To: to, ChunkSize: s.geo.ChunkSize, Unit: s.unit, Generation: 1, Bitmap: make([]byte, s.bitmapLen()), Absent: absent}
	current := tmp
	err = func() error {
		f, err := os.OpenFile(tmp, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		// Generation 1 goes to the second slot; the first stays zero
		// (invalid) until the next update.
		if _, err := f.WriteAt(encodeVersionSlot(&m, int(s.geo.MetaPageSize/2)), s.geo.MetaPageSize/2); err != nil {
			return err
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return fmt.Errorf("fdatasync: %w", err)
		}
		if err := fsutil.RenameNoReplace(tmp, final); err != nil {
			return err
		}
		current = final
		return fsutil.SyncDir(s.dir)
	}()
	if err != nil {
		if rerr := s.pool.Recycle(current); rerr != nil {
			s.log.Error("cannot return the file of a failed version creation to the pool", "file", current, "err", rerr)
		}
		return nil, fmt.Errorf("keep version %d..%d: %w", from, to, err)
	}
	return &version{path: final, meta: m}, nil
}

// writeVersionMeta makes m the version's meta, durably, in the slot the
// current one is not in.
func (s *Store) writeVersionMeta(v *version, m versionMeta) error {
	m.Generation = v.meta.Generation + 1
	half := s.geo.MetaPageSize / 2
	f, err := os.OpenFile(v.path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(encodeVersionSlot(&m, int(half)), int64(m.Generation%2)*half); err != nil {
		return fmt.Errorf("write version meta: %w", err)
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("fdatasync version meta: %w", err)
	}
	v.meta = m
	return nil
}

// pages returns the pages [first, last] of the copy unit that [off, off+n)
// touches.
func (s *Store) pages(off, n int64) (first, last int64) {
	return off / s.unit, (off + n - 1) / s.unit
}

// pageSpan returns the chunk range of page i (the last may be short).
func (s *Store) pageSpan(i int64) (off, n int64) {
	off = i * s.unit
	return off, min(s.unit, s.geo.ChunkSize-off)
}

// copyOut copies the pages of the chunk that [off, off+n) overwrites and
// that v does not hold yet into v, durably, then marks them held, durably.
// c.cow held.
func (s *Store) copyOut(c *chunk, v *version, off, n int64) error {
	first, last := s.pages(off, n)
	var todo []int64
	for i := first; i <= last; i++ {
		// A page the chunk did not own needs no copy: the version's
		// snapshots read the clone's source there.
		if !v.meta.covers(i) {
			todo = append(todo, i)
		}
	}
	if len(todo) == 0 {
		return nil
	}
	h, err := s.files.acquire(c)
	if err != nil {
		return err
	}
	defer h.release()
	f, err := os.OpenFile(v.path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, s.unit)
	for _, i := range todo {
		po, pn := s.pageSpan(i)
		if _, err := h.f.ReadAt(buf[:pn], s.geo.MetaPageSize+po); err != nil {
			return fmt.Errorf("read page %d: %w", i, err)
		}
		if _, err := f.WriteAt(buf[:pn], s.geo.MetaPageSize+po); err != nil {
			return fmt.Errorf("copy page %d: %w", i, err)
		}
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return fmt.Errorf("fdatasync version: %w", err)
	}
	m := v.meta.clone()
	for _, i := range todo {
		m.set(i)
	}
	return s.writeVersionMeta(v, m)
}

// DeleteSN deletes a chunk as a write of sequence number sn whose volume's
// newest live snapshot is keep: when that snapshot may read the chunk
// (keep at least its CreatedSN), the chunk is zeroed through copy on write
// instead, a piece at a time; otherwise, or with sn 0, it is deleted
// (Delete). A missing chunk has nothing to delete.
func (s *Store) DeleteSN(id, sn, keep uint64) error {
	c, err := s.lookup(id)
	if err != nil || c == nil {
		return err
	}
	if sn == 0 || keep == 0 || keep < c.meta.CreatedSN {
		return s.Delete(id)
	}
	zeros := make([]byte, min(s.geo.ChunkSize, 1<<20))
	for off := int64(0); off < s.geo.ChunkSize; off += int64(len(zeros)) {
		n := min(int64(len(zeros)), s.geo.ChunkSize-off)
		if err := s.WriteAtSN(id, zeros[:n], off, sn, keep); err != nil {
			return err
		}
	}
	return nil
}

// KeptStats counts the store's version files and the bytes of data they
// hold (pages times the copy unit).
func (s *Store) KeptStats() (files int, kept int64) {
	s.mu.RLock()
	chunks := make([]*chunk, 0, len(s.mu.chunks))
	for _, c := range s.mu.chunks {
		chunks = append(chunks, c)
	}
	s.mu.RUnlock()
	for _, c := range chunks {
		c.cow.RLock()
		for _, v := range c.versions {
			files++
			kept += int64(v.meta.held()) * v.meta.Unit
		}
		c.cow.RUnlock()
	}
	return files, kept
}

// ReadAtSN reads len(p) bytes at off of the chunk as it was at the end of
// sequence number snap (a snapshot's), with ReadAt's rules for the range. A
// missing chunk gives ErrChunkNotExist. Pages a clone's chunk did not own
// then read as zeros (ReadOwnedSN says which).
func (s *Store) ReadAtSN(id uint64, p []byte, off int64, snap uint64) error {
	_, err := s.ReadOwnedSN(id, p, off, snap)
	return err
}

// ReadOwnedSN is ReadAtSN that also says which pages of the range read from
// the clone's source at snap (bit k for the k-th page the range touches, as
// ReadOwned; p holds zeros there): those a clone's chunk did not own then,
// and every page when the chunk was created after snap (it did not exist:
// a clone reads its source there, other volumes zeros). absent is nil when
// there are none.
func (s *Store) ReadOwnedSN(id uint64, p []byte, off int64, snap uint64) (absent []byte, err error) {
	if snap == 0 {
		return nil, ErrNoSnapshot
	}
	if err := s.checkRange(len(p), off); err != nil {
		return nil, fmt.Errorf("read chunk %d: %w", id, err)
	}
	c, err := s.lookup(id)
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("read chunk %d: %w", id, ErrChunkNotExist)
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return nil, fmt.Errorf("read chunk %d: %w", c.id, c.gone)
	}
	if c.corrupt != nil {
		return nil, fmt.Errorf("read: %w", c.corrupt)
	}
	c.cow.RLock()
	defer c.cow.RUnlock()
	first, last := s.pages(off, int64(len(p)))
	mark := func(i int64) {
		if absent == nil {
			absent = make([]byte, (last-first+8)/8)
		}
		absent[(i-first)/8] |= 1 << ((i - first) % 8)
	}
	if snap < c.meta.CreatedSN {
		clear(p)
		for i := first; i <= last; i++ {
			mark(i)
		}
		return absent, nil
	}
	h, err := s.files.acquire(c)
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	defer h.release()
	var open map[*version]*os.File
	defer func() {
		for _, f := range open {
			_ = f.Close()
		}
	}()
	c.data.RLock()
	defer c.data.RUnlock()
	owned := c.ownedSnapshot()
	// source returns where page i of the snapshot is read from; nil
	// with no error: a page the chunk did not own (zeros here).
	source := func(i int64) (*os.File, error) {
		current := func() (*os.File, error) {
			if owned != nil && owned[i/8]&(1<<(i%8)) == 0 {
				return nil, nil
			}
			return h.f, nil
		}
		if snap >= c.sn {
			return current()
		}
		for _, v := range c.versions {
			if v.corrupt != nil && v.meta.From <= snap {
				// Its range and pages are unknown: it may hold this.
				return nil, v.corrupt
			}
			if v.meta.To < snap {
				continue
			}
			if v.meta.absent(i) {
				return nil, nil
			}
			if !v.meta.has(i) {
				continue
			}
			f := open[v]
			if f == nil {
				f, err := os.Open(v.path)
				if err != nil {
					return nil, err
				}
				if open == nil {
					open = map[*version]*os.File{}
				}
				open[v] = f
				return f, nil
			}
			return f, nil
		}
		return current()
	}
	// Runs of pages read from the same file go in one read.
	for i := first; i <= last; {
		src, err := source(i)
		if err != nil {
			return nil, fmt.Errorf("read chunk %d at %d: %w", c.id, snap, err)
		}
		j := i + 1
		for ; j <= last; j++ {
			if next, err := source(j); err != nil || next != src {
				break
			}
		}
		lo := max(i*s.unit, off)
		hi := min(j*s.unit, off+int64(len(p)), s.geo.ChunkSize)
		if src == nil {
			clear(p[lo-off : hi-off])
			for k := i; k < j; k++ {
				mark(k)
			}
		} else if _, err := src.ReadAt(p[lo-off:hi-off], s.geo.MetaPageSize+lo); err != nil {
			return nil, fmt.Errorf("read chunk %d at %d: %w", c.id, snap, err)
		}
		i = j
	}
	return absent, nil
}

// Trim drops what no live snapshot reads any more of the chunk's versions,
// live being the sequence numbers of the volume's live snapshots below
// bound, the volume's sequence number when they were listed. A version
// that no live snapshot at or before its To reads is recycled, and one that
// only older snapshots read through is merged into the version before it
// (its pages that one does not hold are copied over, durably, before it is
// recycled). Versions that reach bound are left alone: snapshots taken
// after the list was made may read them (a trim replayed after a crash
// finds versions that later writes made). A missing chunk has nothing to
// trim.
func (s *Store) Trim(id uint64, live []uint64, bound uint64) error {
	c, err := s.lookup(id)
	if err != nil || c == nil {
		return err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return nil
	}
	c.cow.Lock()
	defer c.cow.Unlock()
	for _, v := range c.versions {
		if v.corrupt != nil {
			// Its range is unknown: dropping or merging around it could
			// lose what a snapshot reads. Kept until the replica is
			// rebuilt.
			return nil
		}
	}
	// Snapshots taken before the chunk was created read it as zeros.
	live = slices.DeleteFunc(slices.Sorted(slices.Values(live)), func(x uint64) bool { return x < c.meta.CreatedSN })
	liveIn := func(a, b uint64) bool {
		i, _ := slices.BinarySearch(live, a)
		return i < len(live) && live[i] <= b
	}
	for i := len(c.versions) - 1; i >= 0; i-- {
		v := c.versions[i]
		switch {
		case v.meta.To >= bound:
		case !liveIn(0, v.meta.To):
			// Neither v nor any older version is read.
			for _, old := range c.versions[:i+1] {
				if err := s.pool.Recycle(old.path); err != nil {
					return fmt.Errorf("trim chunk %d: %w", id, err)
				}
				c.versions = c.versions[1:]
			}
			return nil
		case liveIn(v.meta.From, v.meta.To) || i == 0:
		case c.versions[i-1].meta.To+1 == v.meta.From:
			if err := s.merge(c.versions[i-1], v); err != nil {
				return fmt.Errorf("trim chunk %d: %w", id, err)
			}
			if err := s.pool.Recycle(v.path); err != nil {
				return fmt.Errorf("trim chunk %d: %w", id, err)
			}
			c.versions = slices.Delete(c.versions, i, i+1)
		}
	}
	return nil
}

// merge copies the pages of next that prev does not hold into prev and
// extends prev to next's To, durably.
func (s *Store) merge(prev, next *version) error {
	src, err := os.Open(next.path)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(prev.path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer dst.Close()
	m := prev.meta.clone()
	m.To = next.meta.To
	buf := make([]byte, s.unit)
	for i := range (s.geo.ChunkSize + s.unit - 1) / s.unit {
		if next.meta.absent(i) && !m.covers(i) {
			if m.Absent == nil {
				m.Absent = make([]byte, len(m.Bitmap))
			}
			m.Absent[i/8] |= 1 << (i % 8)
			continue
		}
		if !next.meta.has(i) || m.covers(i) {
			continue
		}
		po, pn := s.pageSpan(i)
		if _, err := src.ReadAt(buf[:pn], s.geo.MetaPageSize+po); err != nil {
			return fmt.Errorf("merge page %d: %w", i, err)
		}
		if _, err := dst.WriteAt(buf[:pn], s.geo.MetaPageSize+po); err != nil {
			return fmt.Errorf("merge page %d: %w", i, err)
		}
		m.set(i)
	}
	if err := unix.Fdatasync(int(dst.Fd())); err != nil {
		return fmt.Errorf("fdatasync version: %w", err)
	}
	return s.writeVersionMeta(prev, m)
}
