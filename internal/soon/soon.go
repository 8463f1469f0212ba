package soon

import (
	"testing"
	"time"
)

// Succeeds calls f until it returns nil; when d passes first it fails t
// with f's last error.
func Succeeds(t testing.TB, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	pause := time.Millisecond
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %v: %v", d, err)
		}
		time.Sleep(pause)
		pause = min(2*pause, 50*time.Millisecond)
	}
}

// True waits until cond holds; when d passes first it fails t, naming what
// it waited for.
func True(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	Succeeds(t, d, func() error {
		if cond() {
			return nil
		}
		return errNotYet(what)
	})
}

type errNotYet string

func (e errNotYet) Error() string { return "still waiting for " + string(e) }
