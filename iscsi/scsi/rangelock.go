package scsi

import "sync"

// rangeLock serialises commands that must be atomic against other writes
// to the same blocks. Ordinary writes take a shared hold on their range,
// COMPARE AND WRITE and ORWRITE an exclusive one: shared holds never wait
// for each other, an exclusive hold waits for every overlapping hold that
// arrived before it, and later overlapping holds wait for it. Holds are
// queued in arrival order and only ever wait for earlier ones, so nothing
// starves and nothing deadlocks.
type rangeLock struct {
	mu    sync.Mutex
	queue []*rangeHold // arrival order
}

type rangeHold struct {
	start, end uint64 // [start, end) in blocks
	exclusive  bool
	done       chan struct{} // closed on release
}

func (h *rangeHold) conflicts(o *rangeHold) bool {
	return h.start < o.end && o.start < h.end && (h.exclusive || o.exclusive)
}

// lock blocks until [start, start+n) is held and returns the hold to
// release. A zero-length range is never blocked.
func (l *rangeLock) lock(start, n uint64, exclusive bool) *rangeHold {
	h := &rangeHold{start: start, end: start + n, exclusive: exclusive, done: make(chan struct{})}
	if n == 0 {
		return h
	}
	l.mu.Lock()
	l.queue = append(l.queue, h)
	for {
		var wait *rangeHold
		for _, o := range l.queue {
			if o == h {
				break
			}
			if o.conflicts(h) {
				wait = o
				break
			}
		}
		if wait == nil {
			l.mu.Unlock()
			return h
		}
		l.mu.Unlock()
		<-wait.done
		l.mu.Lock()
	}
}

// unlock releases a hold taken by lock.
func (l *rangeLock) unlock(h *rangeHold) {
	if h.end == h.start {
		return
	}
	l.mu.Lock()
	for i, o := range l.queue {
		if o == h {
			l.queue = append(l.queue[:i], l.queue[i+1:]...)
			break
		}
	}
	l.mu.Unlock()
	close(h.done)
}
