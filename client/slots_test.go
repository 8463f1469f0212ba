package client

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
)

// TestFailedIOGivesBackEverySlot: when one piece of an IO fails (or its
// caller gives up) while more are queued, every slot for chunk requests in
// flight the IO took is given back. A slot kept by the loop that stopped
// was lost for good: after as many losses as the handle has slots, every
// IO on it waited until its context ended.
func TestFailedIOGivesBackEverySlot(t *testing.T) {
	v := &Volume{sem: make(chan struct{}, 4), ctx: context.Background()}
	ps := make([]piece, 64)
	boom := errors.New("boom")
	for round := range 500 {
		var calls atomic.Int64
		err := v.run(context.Background(), ps, func(ctx context.Context, p piece) error {
			if calls.Add(1) == 1 {
				return boom
			}
			return nil
		})
		if !errors.Is(err, boom) {
			t.Fatalf("round %d: %v, want the failed piece's error", round, err)
		}
		if n := len(v.sem); n != 0 {
			t.Fatalf("round %d: %d of %d slots still taken after the IO returned", round, n, cap(v.sem))
		}
	}
}
