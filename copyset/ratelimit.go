package copyset

import (
	"context"
	"sync"
	"time"
)

// rateLimiter paces snapshot bytes across every transfer of the engine.
type rateLimiter struct {
	rate int64
	mu   sync.Mutex
	next time.Time
}

func newRateLimiter(bytesPerSec int64) *rateLimiter { return &rateLimiter{rate: bytesPerSec} }

// wait blocks until n more bytes may be sent.
func (r *rateLimiter) wait(ctx context.Context, n int) error {
	if r.rate <= 0 {
		return nil
	}
	r.mu.Lock()
	now := time.Now()
	if r.next.Before(now) {
		r.next = now
	}
	at := r.next
	r.next = r.next.Add(time.Duration(float64(n) / float64(r.rate) * float64(time.Second)))
	r.mu.Unlock()
	if d := time.Until(at); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
