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
// failed, if not nil, is called once, as soon as a chunk's data may be
// lost (its fdatasync or its owned pages' write-down failed) and before
// anything else is done about it: from then on reads may see the chunk as
// it was before the writes since the last Sync, and the caller stops them
// there. No chunk lock is held while it runs.
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
	for _, c := range todo {
		lost, err := s.syncChunk(c)
		if lost {
			if failed != nil {
				failed()
				failed = nil
			}
			c.mu.RLock()
			c.revertOwned()
			c.mu.RUnlock()
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// syncChunk fdatasyncs one chunk and writes its owned pages down; lost
// reports that the chunk's data or owned pages may be lost (the caller
// reverts the owned pages).
func (s *Store) syncChunk(c *chunk) (lost bool, err error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return false, nil // deleted: nothing of it needs to survive
	}
	// Clear the mark before the fdatasync: a write finishing after this
	// point either is covered by the fdatasync or marks the chunk again.
	if !c.dirty.Swap(false) {
		return false, nil
	}
	// A clone chunk's owned pages as they are before the fdatasync: the
	// data of each is then durable when the bits are written down.
	bits := c.ownedSnapshot()
	h, err := s.files.acquire(c)
	if err != nil {
		c.dirty.Store(true)
		return false, fmt.Errorf("sync: %w", err)
	}
	if hook := s.knobs.BeforeFdatasync; hook != nil {
		hook(c.id)
	}
	err = unix.Fdatasync(h.fd)
	h.release()
	if err != nil {
		c.dirty.Store(true)
		return true, fmt.Errorf("sync chunk %d: fdatasync: %w", c.id, err)
	}
	if bits != nil {
		if err := s.saveOwned(c, bits); err != nil {
			c.dirty.Store(true)
			return true, fmt.Errorf("sync: %w", err)
		}
	}
	return false, nil
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
