package copyset

import (
	"context"
	"errors"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
)

// TestCancelledCallerIsNeverProposed: a caller that gave up by the time its
// proposal would be queued gets its context's error and nothing enters the
// log. A retrying client that cancels an old write and then writes anew must
// never see the old write land after the new one.
func TestCancelledCallerIsNeverProposed(t *testing.T) {
	tc := newTestCluster(t, 3, 16, nil)
	id := MakeGroupID(6, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	tc.writeRetry(id, 1, 0, pattern("first|", testBlock))
	c := tc.leader(id)

	// Cancelled while waiting (here: inside the fence, the last moment
	// before the proposal is queued).
	ctx, cancel := context.WithCancel(context.Background())
	fence := func() (func(), error) {
		cancel()
		return func() {}, nil
	}
	if _, err := c.ProposeWrite(ctx, fence, ClientRequest{}, 1, 1, 1, 0, pattern("stale|", testBlock)); !errors.Is(err, context.Canceled) {
		t.Fatalf("proposal of a cancelled caller: err = %v, want context.Canceled", err)
	}
	// A later write is the last word.
	tc.writeRetry(id, 1, 0, pattern("second|", testBlock))
	if got := tc.readRetry(id, 1, 0, testBlock); string(got[:7]) != "second|" {
		t.Fatalf("block holds %.12q after the cancelled proposal; want the later write", got)
	}
	// Nothing of the cancelled proposal is held in the budget either.
	soon.Succeeds(t, 5*time.Second, func() error {
		if v := tc.node(c.e.cfg.NodeID).engine.InflightBytes(); v != 0 {
			return errors.New("budget still held")
		}
		return nil
	})
}
