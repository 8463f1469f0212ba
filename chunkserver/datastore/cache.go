package datastore

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// DefaultFileCacheSize is the descriptor bound of a FileCache made with a
// non-positive capacity.
const DefaultFileCacheSize = 1024

// FileCache keeps chunk files open, least recently used first out, with a
// bound on the number of open descriptors. One cache is meant to be shared by
// every Store of a chunkserver (hundreds of copysets times dozens of chunks),
// so that the process's descriptor count stays bounded however many chunks
// it holds. A descriptor evicted while an IO uses it is closed when the IO
// ends. Safe for concurrent use.
type FileCache struct {
	capacity int

	mu struct {
		sync.Mutex
		n          int
		head, tail *chunk // most recently used first
	}
	hits, misses, evictions atomic.Uint64
}

// NewFileCache returns a cache holding at most capacity open files.
func NewFileCache(capacity int) *FileCache {
	if capacity <= 0 {
		capacity = DefaultFileCacheSize
	}
	return &FileCache{capacity: capacity}
}

// FileCacheStats are counters for metrics.
type FileCacheStats struct {
	Open                    int
	Capacity                int
	Hits, Misses, Evictions uint64
}

// Stats returns the cache's counters.
func (fc *FileCache) Stats() FileCacheStats {
	fc.mu.Lock()
	n := fc.mu.n
	fc.mu.Unlock()
	return FileCacheStats{Open: n, Capacity: fc.capacity, Hits: fc.hits.Load(), Misses: fc.misses.Load(), Evictions: fc.evictions.Load()}
}

// handle is an open chunk file with a reference count: one reference for the
// cache while the handle is cached, one for each IO using it.
type handle struct {
	f    *os.File
	fd   int
	refs atomic.Int32
}

func (h *handle) release() {
	if h.refs.Add(-1) == 0 {
		_ = h.f.Close()
	}
}

// acquire returns c's open file with a reference the caller releases,
// opening the file on a miss. The caller holds c.mu (read or write), which
// keeps c's file in place.
func (fc *FileCache) acquire(c *chunk) (*handle, error) {
	fc.mu.Lock()
	if h := c.h; h != nil {
		h.refs.Add(1)
		fc.moveFrontLocked(c)
		fc.mu.Unlock()
		fc.hits.Add(1)
		return h, nil
	}
	fc.mu.Unlock()
	fc.misses.Add(1)
	f, err := os.OpenFile(c.path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open chunk %d: %w", c.id, err)
	}
	return fc.insert(c, f), nil
}

// insert caches f as c's file and returns it with a reference for the
// caller. When another goroutine cached c meanwhile, f is closed and the
// cached file returned.
func (fc *FileCache) insert(c *chunk, f *os.File) *handle {
	fc.mu.Lock()
	if h := c.h; h != nil {
		h.refs.Add(1)
		fc.moveFrontLocked(c)
		fc.mu.Unlock()
		_ = f.Close()
		return h
	}
	h := &handle{f: f, fd: int(f.Fd())}
	h.refs.Store(2)
	c.h = h
	fc.pushFrontLocked(c)
	fc.mu.n++
	var victim *handle
	if fc.mu.n > fc.capacity && fc.mu.tail != c {
		t := fc.mu.tail
		victim = t.h
		fc.unlinkLocked(t)
		t.h = nil
		fc.mu.n--
	}
	fc.mu.Unlock()
	if victim != nil {
		fc.evictions.Add(1)
		victim.release()
	}
	return h
}

// remove drops c's file from the cache; it is closed once no IO uses it.
func (fc *FileCache) remove(c *chunk) {
	fc.mu.Lock()
	h := c.h
	if h != nil {
		fc.unlinkLocked(c)
		c.h = nil
		fc.mu.n--
	}
	fc.mu.Unlock()
	if h != nil {
		h.release()
	}
}

func (fc *FileCache) pushFrontLocked(c *chunk) {
	c.prev, c.next = nil, fc.mu.head
	if fc.mu.head != nil {
		fc.mu.head.prev = c
	}
	fc.mu.head = c
	if fc.mu.tail == nil {
		fc.mu.tail = c
	}
}

func (fc *FileCache) unlinkLocked(c *chunk) {
	if c.prev != nil {
		c.prev.next = c.next
	} else {
		fc.mu.head = c.next
	}
	if c.next != nil {
		c.next.prev = c.prev
	} else {
		fc.mu.tail = c.prev
	}
	c.prev, c.next = nil, nil
}

func (fc *FileCache) moveFrontLocked(c *chunk) {
	if fc.mu.head == c {
		return
	}
	fc.unlinkLocked(c)
	fc.pushFrontLocked(c)
}
