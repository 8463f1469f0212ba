package client

import (
	"context"
	"sync"
)

// byteBudget bounds the bytes of chunk requests in flight for a volume.
// Waiters are served in arrival order, so a large piece is not starved by
// small ones. A caller whose context ends stops waiting.
type byteBudget struct {
	mu      sync.Mutex
	used    int64
	max     int64
	waiters []*budgetWaiter
	// observe, when set, is called with the bytes in flight after every
	// acquisition (Options.TestingKnobs).
	observe func(int64)
}

type budgetWaiter struct {
	n     int64
	ready chan struct{}
}

// acquire takes n bytes of the budget (at most max), waiting until they are
// free or ctx ends.
func (b *byteBudget) acquire(ctx context.Context, n int64) error {
	b.mu.Lock()
	if len(b.waiters) == 0 && b.used+n <= b.max {
		b.used += n
		b.noteLocked()
		b.mu.Unlock()
		return nil
	}
	w := &budgetWaiter{n: n, ready: make(chan struct{})}
	b.waiters = append(b.waiters, w)
	b.mu.Unlock()
	select {
	case <-w.ready:
		return nil
	case <-ctx.Done():
	}
	b.mu.Lock()
	select {
	case <-w.ready:
		// Granted meanwhile: give it back.
		b.used -= n
	default:
		for i, x := range b.waiters {
			if x == w {
				b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
				break
			}
		}
	}
	b.grantLocked()
	b.mu.Unlock()
	return ctx.Err()
}

// release returns n bytes.
func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	b.used -= n
	b.grantLocked()
	b.mu.Unlock()
}

// grantLocked wakes the waiters at the head of the queue that now fit.
func (b *byteBudget) grantLocked() {
	for len(b.waiters) > 0 && b.used+b.waiters[0].n <= b.max {
		w := b.waiters[0]
		b.waiters = b.waiters[1:]
		b.used += w.n
		b.noteLocked()
		close(w.ready)
	}
}

func (b *byteBudget) noteLocked() {
	if b.observe != nil {
		b.observe(b.used)
	}
}

// inUse returns the bytes in flight.
func (b *byteBudget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}
