package copyset

import (
	"sync"
)

// workQueue is a FIFO of copysets with work, shared by a pool of workers.
type workQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	items  []*Copyset
	head   int
	closed bool
}

func newWorkQueue() *workQueue {
	q := &workQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *workQueue) push(c *Copyset) {
	q.mu.Lock()
	q.items = append(q.items, c)
	q.mu.Unlock()
	q.cond.Signal()
}

func (q *workQueue) pop() (*Copyset, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.head == len(q.items) && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		return nil, false
	}
	c := q.items[q.head]
	q.items[q.head] = nil
	q.head++
	if q.head == len(q.items) {
		q.items, q.head = q.items[:0], 0
	}
	return c, true
}

func (q *workQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.cond.Broadcast()
}

// schedFlags make sure a copyset is queued at most once and processed by one
// worker at a time; work arriving while it runs re-queues it afterwards.
type schedFlags struct {
	queued, running, again bool
}

// signal reports whether the caller must push the copyset onto the queue.
func (s *schedFlags) signal() bool {
	switch {
	case s.running:
		s.again = true
		return false
	case s.queued:
		return false
	default:
		s.queued = true
		return true
	}
}

func (s *schedFlags) begin() { s.queued, s.running = false, true }

// end reports whether the copyset must be queued again.
func (s *schedFlags) end() bool {
	s.running = false
	if s.again {
		s.again = false
		s.queued = true
		return true
	}
	return false
}
