package datastore

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
)

// WriteAt writes p at off into the chunk's data, creating the chunk on its
// first write. off and len(p) must be multiples of the block size inside the
// chunk (ErrInvalidRange). The data is not fsynced: see Sync. When a new
// chunk needs a file and the pool has none, the error wraps ErrNoSpace and
// nothing is created.
func (s *Store) WriteAt(id uint64, p []byte, off int64) error {
	return s.write(id, p, off, 0, 0)
}

// write is WriteAt, and WriteAtSN when sn is not 0.
func (s *Store) write(id uint64, p []byte, off int64, sn, keep uint64) error {
	if err := s.checkRange(len(p), off); err != nil {
		return fmt.Errorf("write chunk %d: %w", id, err)
	}
	for {
		c, err := s.lookup(id)
		if err != nil {
			return err
		}
		if c == nil {
			if c, err = s.create(id, sn, false); err != nil {
				return err
			}
		}
		retry, err := s.writeChunk(c, p, off, sn, keep, nil, 0)
		if !retry {
			return err
		}
		// Deleted between lookup and write: the write creates it anew.
	}
}

// writeChunk writes into an existing chunk; under a sequence number (sn
// not 0) it first keeps what snapshots need (snapshot.go); into a clone's
// chunk, it first fills and owns the pages (clone.go). p may be empty when
// fill is not.
func (s *Store) writeChunk(c *chunk, p []byte, off int64, sn, keep uint64, fill []byte, fillOff int64) (retry bool, err error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return c.gone == ErrChunkNotExist, c.gone
	}
	if c.corrupt != nil {
		return false, fmt.Errorf("write: %w", c.corrupt)
	}
	if c.own != nil && fill != nil {
		if err := s.checkFill(c, off, int64(len(p)), fill, fillOff); err != nil {
			return false, err
		}
	}
	if sn != 0 {
		c.cow.Lock()
		defer c.cow.Unlock()
		v, err := s.cut(c, sn, keep)
		if err != nil {
			return false, fmt.Errorf("write chunk %d: %w", c.id, err)
		}
		if v != nil && len(p) > 0 {
			if err := s.copyOut(c, v, off, int64(len(p))); err != nil {
				return false, fmt.Errorf("write chunk %d: copy on write: %w", c.id, err)
			}
		}
	}
	h, err := s.files.acquire(c)
	if err != nil {
		return false, fmt.Errorf("write: %w", err)
	}
	defer h.release()
	// The dirty mark goes after each write (Sync clears it before its
	// fdatasync).
	if c.own != nil && len(fill) > 0 {
		err := s.fillPages(c, h, fill, fillOff)
		c.dirty.Store(true)
		if err != nil {
			return false, fmt.Errorf("write chunk %d: %w", c.id, err)
		}
	}
	if len(p) > 0 {
		c.data.Lock()
		_, err = fsutil.WriteAtInPieces(h.f, p, s.geo.MetaPageSize+off)
		if err == nil && c.own != nil {
			s.ownRange(c, off, int64(len(p)))
		}
		c.data.Unlock()
		if err != nil {
			return false, fmt.Errorf("write chunk %d: %w", c.id, err)
		}
		c.dirty.Store(true)
	}
	return false, nil
}

// create makes chunk id from a pool file, created under sequence number sn
// (a clone's chunk, owning no page, when clone is set), or waits for a
// creation of the same chunk under way.
func (s *Store) create(id, sn uint64, clone bool) (*chunk, error) {
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

	c, err := s.createFile(id, sn, clone)

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
func (s *Store) createFile(id, sn uint64, clone bool) (*chunk, error) {
	final := filepath.Join(s.dir, chunkName(id))
	tmp := final + creatingSuffix
	ctx, cancel := context.WithTimeout(context.Background(), s.wait)
	err := s.pool.GetContext(ctx, tmp)
	cancel()
	if err != nil {
		if errors.Is(err, chunkfilepool.ErrPoolEmpty) {
			return nil, fmt.Errorf("create chunk %d: %w: %w", id, ErrNoSpace, err)
		}
		return nil, fmt.Errorf("create chunk %d: %w", id, err)
	}
	current := tmp
	meta := ChunkMeta{Version: MetaVersion, ChunkID: id, CreatedSN: sn, ChunkSize: s.geo.ChunkSize}
	var own *owned
	if clone {
		meta.Flags = MetaFlagClone
		own = &owned{path: filepath.Join(s.dir, ownName(id)), bits: make([]byte, s.bitmapLen())}
		// Bits of a chunk deleted before (an own file its delete left)
		// must not come back.
		own.saved = slices.Clone(own.bits)
		if err := os.Remove(own.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			_ = s.pool.Recycle(tmp)
			return nil, fmt.Errorf("create chunk %d: %w", id, err)
		}
	}
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err == nil {
		err = func() error {
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
	c := &chunk{id: id, path: final, meta: meta, sn: max(sn, 1), own: own}
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
	_, err := s.readChunkOwned(c, p, off, false)
	return err
}

// readChunkOwned reads the chunk's data and, with owned, the owned pages of
// a clone's chunk as they were for that read (nil for other chunks).
func (s *Store) readChunkOwned(c *chunk, p []byte, off int64, owned bool) ([]byte, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return nil, fmt.Errorf("read chunk %d: %w", c.id, c.gone)
	}
	if c.corrupt != nil {
		return nil, fmt.Errorf("read: %w", c.corrupt)
	}
	h, err := s.files.acquire(c)
	if err != nil {
		return nil, fmt.Errorf("read: %w", err)
	}
	var bits []byte
	c.data.RLock()
	if owned {
		bits = c.ownedSnapshot()
	}
	_, err = h.f.ReadAt(p, s.geo.MetaPageSize+off)
	c.data.RUnlock()
	h.release()
	if err != nil {
		return nil, fmt.Errorf("read chunk %d: %w", c.id, err)
	}
	return bits, nil
}

// Delete removes the chunk and its version files and returns their files to
// the pool, which zeroes them before reuse. Deleting a missing chunk
// succeeds. Corrupt chunks can be deleted.
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
	// Versions first, newest first: one left by a failure stays with its
	// chunk (a retried Delete finds both), never orphaned beside a chunk
	// created again under the same id.
	for len(c.versions) > 0 {
		v := c.versions[len(c.versions)-1]
		if err := s.pool.Recycle(v.path); err != nil {
			if _, serr := os.Lstat(v.path); serr == nil {
				back := &chunk{id: id, path: c.path, meta: c.meta, corrupt: c.corrupt, sn: c.sn, versions: c.versions, own: c.own}
				back.dirty.Store(c.dirty.Load())
				s.mu.Lock()
				if s.mu.chunks[id] == nil && !s.mu.closed {
					s.mu.chunks[id] = back
				}
				s.mu.Unlock()
			}
			return fmt.Errorf("delete chunk %d: version file: %w", id, err)
		}
		c.versions = c.versions[:len(c.versions)-1]
	}
	err := s.pool.Recycle(c.path)
	if k := s.knobs.AfterRecycle; k != nil && err == nil {
		err = k(id)
	}
	if err != nil {
		if _, serr := os.Lstat(c.path); errors.Is(serr, os.ErrNotExist) {
			// Moved to the pool, but a directory fsync failed: the chunk is
			// gone here either way (a chunk put back would name a file that
			// no longer exists).
			return fmt.Errorf("delete chunk %d: %w", id, err)
		}
		// The file is still in place: keep the chunk.
		back := &chunk{id: id, path: c.path, meta: c.meta, corrupt: c.corrupt, sn: c.sn, versions: c.versions, own: c.own}
		back.dirty.Store(c.dirty.Load())
		s.mu.Lock()
		if s.mu.chunks[id] == nil && !s.mu.closed {
			s.mu.chunks[id] = back
		}
		s.mu.Unlock()
		return fmt.Errorf("delete chunk %d: %w", id, err)
	}
	if c.own != nil || c.meta.Flags&MetaFlagClone != 0 {
		// An own file left by a failure here is removed at the next Open
		// or when the chunk is created again.
		if err := os.Remove(filepath.Join(s.dir, ownName(id))); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("cannot remove the owned pages of a deleted clone chunk", "chunk", id, "err", err)
		}
	}
	return nil
}

// Exists reports whether the chunk exists, without reading its data: now
// (snap 0), or in the snapshot at sequence number snap, which a chunk
// created after it does not exist in (it reads as zeros there, or from a
// clone's source: see ReadOwnedSN). A chunk whose meta page does not check
// out exists (reading it reports the failure).
func (s *Store) Exists(id, snap uint64) (bool, error) {
	c, err := s.lookup(id)
	if err != nil || c == nil {
		return false, err
	}
	if c.corrupt != nil {
		return true, nil
	}
	return snap == 0 || snap >= c.meta.CreatedSN, nil
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
	c.cow.RLock()
	defer c.cow.RUnlock()
	info := ChunkInfo{ID: id, Size: s.geo.ChunkSize, SN: c.sn, CreatedSN: c.meta.CreatedSN, Version: c.meta.Version}
	for _, v := range c.versions {
		info.Versions = append(info.Versions, VersionInfo{From: v.meta.From, To: v.meta.To, Pages: v.meta.held(), CopyUnit: v.meta.Unit})
	}
	if bits := c.ownedSnapshot(); bits != nil {
		info.Clone = true
		info.OwnedPages = (&versionMeta{Bitmap: bits}).held()
	}
	return info, nil
}

// Hash returns the CRC32C (Castagnoli) of length bytes at off of the chunk's
// data; length 0 means to the end of the chunk. The range follows ReadAt's
// rules. A clone's chunk's owned pages (clone.go) are hashed after the
// data, so that replicas that own different pages differ.
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
	bits := c.ownedSnapshot()
	for done := int64(0); done < length; {
		n := min(int64(len(buf)), length-done)
		if err := s.readChunk(c, buf[:n], off+done); err != nil {
			return 0, err
		}
		crc = crc32.Update(crc, castagnoli, buf[:n])
		done += n
	}
	if bits != nil {
		crc = crc32.Update(crc, castagnoli, bits)
	}
	return crc, nil
}

// HashSnapshots returns the CRC32C (Castagnoli) of the range as Hash does,
// continued over the same range as it was at each of snaps in turn
// (ReadOwnedSN, with the pages read from a clone's source): one checksum of
// a chunk's data and of what its snapshots read.
func (s *Store) HashSnapshots(id uint64, off, length int64, snaps []uint64) (uint32, error) {
	crc, err := s.Hash(id, off, length)
	if err != nil {
		return 0, err
	}
	if length == 0 {
		length = s.geo.ChunkSize - off
	}
	bp := s.hashBufs.Get().(*[]byte)
	defer s.hashBufs.Put(bp)
	buf := *bp
	for _, snap := range snaps {
		for done := int64(0); done < length; {
			n := min(int64(len(buf)), length-done)
			absent, err := s.ReadOwnedSN(id, buf[:n], off+done, snap)
			if err != nil {
				return 0, fmt.Errorf("hash chunk %d at snapshot %d: %w", id, snap, err)
			}
			crc = crc32.Update(crc, castagnoli, buf[:n])
			// Which pages read from a clone's source: replicas must agree
			// on those too.
			crc = crc32.Update(crc, castagnoli, absent)
			done += n
		}
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
