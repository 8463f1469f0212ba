package nbd

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// Payload buffers come from pools by power-of-two size class, 4 KiB to 32 MiB, so that a busy
// connection does not allocate a buffer per request.
const (
	minClassShift = 12
	maxClassShift = 25
)

var bufferPools [maxClassShift - minClassShift + 1]sync.Pool

// getBuffer returns a buffer of length n. Its contents are unspecified.
func getBuffer(n uint32) *[]byte {
	if n == 0 {
		b := []byte{}
		return &b
	}
	shift := max(bits.Len32(n-1), minClassShift)
	if shift > maxClassShift {
		b := make([]byte, n)
		return &b
	}
	if v := bufferPools[shift-minClassShift].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<shift)
	return &b
}

// putBuffer returns a buffer obtained from getBuffer. The caller must not use it afterwards.
func putBuffer(b *[]byte) {
	c := cap(*b)
	if c == 0 || c&(c-1) != 0 {
		return
	}
	shift := bits.Len(uint(c)) - 1
	if shift < minClassShift || shift > maxClassShift {
		return
	}
	*b = (*b)[:c]
	bufferPools[shift-minClassShift].Put(b)
}

// zeroes is written by WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE. Backends must not modify what
// they are given to write (the io.WriterAt contract), so one buffer serves every request.
var zeroes = make([]byte, 1<<20)

// limiter bounds the requests of one connection in flight, by count and by payload bytes.
// A request larger than the byte budget is admitted when nothing else is in flight.
type limiter struct {
	mu       sync.Mutex
	cond     sync.Cond
	n        int
	bytes    int64
	maxN     int
	maxBytes int64
	total    *atomic.Int64 // the server's bytes in flight over all connections
	observe  func(int64)   // TestingKnobs.OnInFlightBytes
}

func newLimiter(maxN int, maxBytes int64, total *atomic.Int64, observe func(int64)) *limiter {
	l := &limiter{maxN: maxN, maxBytes: maxBytes, total: total, observe: observe}
	l.cond.L = &l.mu
	return l
}

// acquire blocks until a request of weight bytes may start. It always returns: requests in
// flight finish (the backend answers), and each releases what it acquired.
func (l *limiter) acquire(weight int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.n >= l.maxN || (l.n > 0 && l.bytes+weight > l.maxBytes) {
		l.cond.Wait()
	}
	l.n++
	l.bytes += weight
	l.total.Add(weight)
	if l.observe != nil {
		l.observe(l.bytes)
	}
}

// alone tells whether exactly one request holds a slot.
func (l *limiter) alone() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n == 1
}

func (l *limiter) release(weight int64) {
	l.mu.Lock()
	l.n--
	l.bytes -= weight
	l.total.Add(-weight)
	l.mu.Unlock()
	l.cond.Broadcast()
}

// writeTracker numbers the write-type requests of a connection (WRITE, TRIM, WRITE_ZEROES) as
// they arrive and knows which are still running, so that a FLUSH can wait for every write that
// arrived before it and for none that arrived after.
type writeTracker struct {
	mu     sync.Mutex
	cond   sync.Cond
	next   uint64
	active map[uint64]struct{}
}

func newWriteTracker() *writeTracker {
	w := &writeTracker{active: make(map[uint64]struct{})}
	w.cond.L = &w.mu
	return w
}

// begin registers a write and returns its sequence number.
func (w *writeTracker) begin() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	seq := w.next
	w.next++
	w.active[seq] = struct{}{}
	return seq
}

// end marks the write seq as complete.
func (w *writeTracker) end(seq uint64) {
	w.mu.Lock()
	delete(w.active, seq)
	w.mu.Unlock()
	w.cond.Broadcast()
}

// barrier returns the sequence number the next write will get: waitBefore(barrier()) waits for
// every write registered so far.
func (w *writeTracker) barrier() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.next
}

// waitBefore blocks until no write numbered below b is running.
func (w *writeTracker) waitBefore(b uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.anyBeforeLocked(b) {
		w.cond.Wait()
	}
}

func (w *writeTracker) anyBeforeLocked(b uint64) bool {
	for seq := range w.active {
		if seq < b {
			return true
		}
	}
	return false
}
