package datastore

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

// Moving a chunk's snapshot state to another replica (a Raft snapshot that
// rebuilds a replica): the sender reads CreatedSN, the kept versions
// (EachKept) and their pages (ReadKept) after the chunk's data; the
// receiver resets the chunk to the sender's CreatedSN (ResetChunk), writes
// its data, and for each version creates it empty (BeginKept), writes its
// pages (WriteKept) and then marks them held, durably after them
// (SealKept). A version only gains pages, and a page it holds never
// changes, so pages read after the bitmap was listed are the bitmap's.

// ErrVersionGone is returned by ReadKept, WriteKept and SealKept for a
// version the chunk does not keep (any more): trimmed or merged since it
// was listed.
var ErrVersionGone = errors.New("datastore: version not kept")

// CreatedSN returns the sequence number the chunk was created under.
func (s *Store) CreatedSN(id uint64) (uint64, error) {
	c, err := s.lookup(id)
	if err != nil {
		return 0, err
	}
	if c == nil {
		return 0, fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	return c.meta.CreatedSN, nil
}

// EachKept calls f with each version the chunk keeps, oldest first: the
// pages set in bitmap (of unit bytes each; f gets a copy) of the chunk as it
// was at the end of sequence numbers from..to, and for a clone's chunk the
// pages it did not own then (absent; nil for none). f must not call the
// store.
func (s *Store) EachKept(id uint64, f func(from, to uint64, unit int64, bitmap, absent []byte)) error {
	c, err := s.lookup(id)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	c.cow.RLock()
	defer c.cow.RUnlock()
	for _, v := range c.versions {
		if v.corrupt != nil {
			return fmt.Errorf("chunk %d: version %d: %w", id, v.meta.From, v.corrupt)
		}
		f(v.meta.From, v.meta.To, v.meta.Unit, slices.Clone(v.meta.Bitmap), slices.Clone(v.meta.Absent))
	}
	return nil
}

// keptVersion returns the chunk's version from from. c.cow held.
func keptVersion(c *chunk, from uint64) (*version, error) {
	for _, v := range c.versions {
		if v.meta.From == from {
			return v, nil
		}
	}
	return nil, fmt.Errorf("chunk %d from %d: %w", c.id, from, ErrVersionGone)
}

// ReadKept reads len(p) bytes at off of the chunk's version from from:
// pages it holds read as they were kept (others as zeros).
func (s *Store) ReadKept(id, from uint64, p []byte, off int64) error {
	return s.withKept(id, from, false, func(v *version) error {
		f, err := os.Open(v.path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.ReadAt(p, s.geo.MetaPageSize+off)
		return err
	})
}

// ResetChunk makes chunk id exist, created under createdSN, with no kept
// version; owned (Owned of the sender) makes it a clone's chunk owning
// those pages, nil one that is not a clone's. A chunk held under another
// CreatedSN, of the other kind or corrupt is deleted first and created
// again. fresh
// reports a chunk created here (all zeros). Writing the data owns what it
// touches: the receiver sets the owned pages again after it (SetOwned).
func (s *Store) ResetChunk(id, createdSN uint64, owned []byte) (fresh bool, err error) {
	if owned != nil && len(owned) != s.bitmapLen() {
		return false, fmt.Errorf("reset chunk %d: %w: owned bitmap of %d bytes, want %d", id, ErrInvalidRange, len(owned), s.bitmapLen())
	}
	c, err := s.lookup(id)
	if err != nil {
		return false, err
	}
	if c != nil && (c.corrupt != nil || c.meta.CreatedSN != createdSN || (c.meta.Flags&MetaFlagClone != 0) != (owned != nil)) {
		if err := s.Delete(id); err != nil {
			return false, err
		}
		c = nil
	}
	if c == nil {
		if c, err = s.create(id, createdSN, owned != nil); err != nil {
			return false, err
		}
		fresh = true
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return false, c.gone
	}
	if c.corrupt != nil {
		return false, c.corrupt
	}
	c.cow.Lock()
	defer c.cow.Unlock()
	for len(c.versions) > 0 {
		if err := s.pool.Recycle(c.versions[0].path); err != nil {
			return false, fmt.Errorf("reset chunk %d: %w", id, err)
		}
		c.versions = c.versions[1:]
	}
	c.sn = max(c.meta.CreatedSN, 1)
	if owned != nil {
		c.own.mu.Lock()
		c.own.bits = slices.Clone(owned)
		c.own.mu.Unlock()
		c.dirty.Store(true)
	}
	return fresh, nil
}

// BeginKept creates the chunk's version from..to, holding no page yet,
// with the pages the chunk did not own then (absent, EachKept's; nil for
// none); it must be newer than every version the chunk keeps.
func (s *Store) BeginKept(id, from, to uint64, absent []byte) error {
	if absent != nil && (len(absent) != s.bitmapLen() || !s.absentFits()) {
		return fmt.Errorf("chunk %d: %w: absent bitmap of %d bytes, want %d", id, ErrInvalidRange, len(absent), s.bitmapLen())
	}
	c, err := s.lookup(id)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return c.gone
	}
	c.cow.Lock()
	defer c.cow.Unlock()
	if n := len(c.versions); from == 0 || to < from || from < c.meta.CreatedSN || n > 0 && c.versions[n-1].meta.To >= from {
		return fmt.Errorf("chunk %d: %w: version %d..%d after %d versions (created under %d)", id, ErrInvalidRange, from, to, len(c.versions), c.meta.CreatedSN)
	}
	v, err := s.createVersion(id, from, to, slices.Clone(absent))
	if err != nil {
		return err
	}
	c.versions = append(c.versions, v)
	c.sn = max(c.sn, to+1)
	return nil
}

// WriteKept writes pages of the chunk's version from from, not durably and
// not marked held until SealKept.
func (s *Store) WriteKept(id, from uint64, p []byte, off int64) error {
	if err := s.checkRange(len(p), off); err != nil {
		return fmt.Errorf("write kept version of chunk %d: %w", id, err)
	}
	return s.withKept(id, from, true, func(v *version) error {
		f, err := os.OpenFile(v.path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteAt(p, s.geo.MetaPageSize+off)
		return err
	})
}

// SealKept makes the pages written into the chunk's version from from
// durable, then marks the pages of bitmap held, durably.
func (s *Store) SealKept(id, from uint64, bitmap []byte) error {
	if len(bitmap) != s.bitmapLen() {
		return fmt.Errorf("seal kept version of chunk %d: %w: bitmap of %d bytes, want %d", id, ErrInvalidRange, len(bitmap), s.bitmapLen())
	}
	return s.withKept(id, from, true, func(v *version) error {
		f, err := os.OpenFile(v.path, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		err = unix.Fdatasync(int(f.Fd()))
		_ = f.Close()
		if err != nil {
			return fmt.Errorf("fdatasync version: %w", err)
		}
		m := v.meta.clone()
		m.Bitmap = slices.Clone(bitmap)
		return s.writeVersionMeta(v, m)
	})
}

// withKept runs f on the chunk's version from from, under the chunk's cow
// lock (exclusive when excl).
func (s *Store) withKept(id, from uint64, excl bool, f func(*version) error) error {
	c, err := s.lookup(id)
	if err != nil {
		return err
	}
	if c == nil {
		return fmt.Errorf("chunk %d: %w", id, ErrChunkNotExist)
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.gone != nil {
		return c.gone
	}
	if excl {
		c.cow.Lock()
		defer c.cow.Unlock()
	} else {
		c.cow.RLock()
		defer c.cow.RUnlock()
	}
	v, err := keptVersion(c, from)
	if err != nil {
		return err
	}
	if err := f(v); err != nil {
		return fmt.Errorf("chunk %d, version %d: %w", id, from, err)
	}
	return nil
}
