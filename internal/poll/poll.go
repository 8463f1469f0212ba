// Package poll waits in daemons and tools (outside tests) for a condition
// that has no notification of its own: a process answering /healthz, a
// cluster becoming usable.
package poll

import (
	"context"
	"fmt"
	"time"
)

// Interval is how often Until calls its function.
const Interval = 100 * time.Millisecond

// Until calls f every Interval until it returns nil or ctx ends; the error
// then names what was waited for and f's last error.
func Until(ctx context.Context, what string, f func() error) error {
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last: %v)", what, ctx.Err(), err)
		case <-time.After(Interval):
		}
	}
}
