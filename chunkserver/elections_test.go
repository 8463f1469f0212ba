package chunkserver

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Split(strings.TrimSpace(s.b.String()), "\n")
}

// TestElectionSummary: the leader changes of many copysets make one info
// line per interval with their number, none for an interval without any,
// and changes from before the loop started are not counted.
func TestElectionSummary(t *testing.T) {
	var buf syncBuffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var total atomic.Uint64
	total.Store(7) // before the loop: not reported
	tick, stop, done := make(chan time.Time), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		electionSummary(log, 10*time.Second, tick, stop, total.Load, func() int { return 12 })
	}()
	tick <- time.Now() // nothing new
	total.Add(391)     // a peer's pause: 391 elections within one interval
	tick <- time.Now()
	tick <- time.Now() // quiet again
	total.Add(2)
	tick <- time.Now()
	close(stop)
	<-done
	lines := buf.lines()
	want := []string{
		`msg="copysets elected new leaders" elections=391 in_last=10s leading_here=12`,
		`msg="copysets elected new leaders" elections=2 in_last=10s leading_here=12`,
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), strings.Join(lines, "\n"))
	}
	for i, w := range want {
		if !strings.Contains(lines[i], w) || !strings.Contains(lines[i], "level=INFO") {
			t.Errorf("line %d: %s\nwant it to contain %s at INFO", i, lines[i], w)
		}
	}
}
