package datastore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// Sync fdatasyncs every chunk written since the previous Sync. A write that
// completed before Sync was called is durable when Sync returns nil; writes
// running concurrently may or may not be included. On error the failed
// chunks stay marked for the next Sync, but the caller must not assume
// their data is on disk (after a failed fdatasync the kernel may have
// dropped the dirty pages): treat it as a disk failure. A failed clone
// chunk's owned pages go back to those last written down, as after a
// crash, so that writes applied again since the last Sync fill their
// pages again.
//
// A chunk's fdatasync excludes reads of its data: when it fails, the file
// may be back at its last synced state from the instant it fails (Linux
// may drop the pages that failed to write; a fault filesystem drops them at
// once), and a read overlapping it could return that past without anyone
// knowing. failed, if not nil, is called once, as soon as a chunk's data
// may be lost (its fdatasync or its owned pages' write-down failed), while
// the chunk is still held from reads: no read of it overlapped the failed
// fdatasync, and none starts before failed returns, so the caller can make
// every later read wait or discard what it reads. failed must not block
// (it must not wait for reads: they may be waiting for the chunk).
func (s *Store) Sync(failed func()) error {
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
	lost := func() {
		if failed != nil {
			failed()
			failed = nil
		}
	}
	for _, c := range todo {
		if err := s.syncChunk(c, lost); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// syncChunk fdatasyncs one chunk and writes its owned pages down. When the
// chunk's data or owned pages may be lost, it calls lost and reverts the
// owned pages before reads of the chunk go on.
func (s *Store) syncChunk(c *chunk, lost func()) error {
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
	// A clone chunk's owned pages as they are before the fdatasync: the
	// data of each is then durable when the bits are written down.
	bits := c.ownedSnapshot()
	h, err := s.files.acquire(c)
	if err != nil {
		c.dirty.Store(true)
		return fmt.Errorf("sync: %w", err)
	}
	defer h.release()
	// Held from reads until a failure is known and reported (see Sync).
	c.data.Lock()
	defer c.data.Unlock()
	if hook := s.knobs.BeforeFdatasync; hook != nil {
		hook(c.id)
	}
	if err := unix.Fdatasync(h.fd); err != nil {
		c.dirty.Store(true)
		lost()
		c.revertOwned()
		return fmt.Errorf("sync chunk %d: fdatasync: %w", c.id, err)
	}
	if bits != nil {
		if err := s.saveOwned(c, bits); err != nil {
			c.dirty.Store(true)
			lost()
			c.revertOwned()
			return fmt.Errorf("sync: %w", err)
		}
	}
	return nil
}

// Close syncs written chunks (see Sync), closes their descriptors and
// releases the directory. Later calls return ErrClosed.
func (s *Store) Close() error {
	err := s.Sync(nil)
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
		_, isChunk := parseChunkName(name)
		_, _, isVersion := parseVersionName(name)
		if !isChunk && !isVersion && !strings.HasSuffix(name, creatingSuffix) {
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
