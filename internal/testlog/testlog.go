package testlog

import (
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
)

// Lines is how many warnings New keeps for a failing test.
const Lines = 200

// New returns a logger for the components a test runs: the last Lines
// records at warn level or above are printed if t fails, or, when
// CAIRN_TEST_LOG is set, records go to stderr as they are logged.
func New(t testing.TB) *slog.Logger {
	if l := FromEnv(); l != nil {
		return l
	}
	r := newRing(Lines)
	t.Cleanup(func() {
		if t.Failed() {
			if s := r.String(); s != "" {
				t.Logf("last warnings logged during the test:\n%s", s)
			}
		}
	})
	return slog.New(slog.NewTextHandler(r, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// FromEnv returns the stderr logger CAIRN_TEST_LOG asks for, or nil when it
// is unset.
func FromEnv() *slog.Logger {
	switch os.Getenv("CAIRN_TEST_LOG") {
	case "":
		return nil
	case "warn":
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	default:
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
}

// ring keeps the last lines written to it; slog's text handler writes one
// record per call.
type ring struct {
	mu    sync.Mutex
	lines []string
	next  int
}

func newRing(n int) *ring { return &ring{lines: make([]string, 0, n)} }

func (r *ring) Write(p []byte) (int, error) {
	line := strings.TrimRight(string(p), "\n")
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.lines) < cap(r.lines) {
		r.lines = append(r.lines, line)
	} else {
		r.lines[r.next] = line
		r.next = (r.next + 1) % len(r.lines)
	}
	return len(p), nil
}

func (r *ring) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := append(append([]string{}, r.lines[r.next:]...), r.lines[:r.next]...)
	return strings.Join(out, "\n")
}
