package soon

import (
	"errors"
	"testing"
	"time"
)

// recorder is a testing.TB that records Fatalf instead of stopping.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = format
}

func TestSucceedsWaitsForTheCondition(t *testing.T) {
	n := 0
	Succeeds(t, 10*time.Second, func() error {
		if n++; n < 5 {
			return errors.New("not yet")
		}
		return nil
	})
	if n != 5 {
		t.Fatalf("called %d times", n)
	}
}

func TestSucceedsFailsAfterTheDeadline(t *testing.T) {
	r := &recorder{TB: t}
	calls := 0
	Succeeds(r, 20*time.Millisecond, func() error {
		calls++
		if r.failed != "" {
			return nil // let the loop end once it reported
		}
		return errors.New("never")
	})
	if r.failed == "" || calls < 2 {
		t.Fatalf("did not fail after the deadline (calls %d)", calls)
	}
}

func TestTrue(t *testing.T) {
	n := 0
	True(t, 10*time.Second, "three calls", func() bool { n++; return n == 3 })
	if n != 3 {
		t.Fatalf("called %d times", n)
	}
}
