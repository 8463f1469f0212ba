package testlog

import (
	"context"
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
	d := &dupReport{t: t}
	t.Cleanup(func() {
		d.mu.Lock()
		d.done = true
		d.mu.Unlock()
		if t.Failed() {
			if s := r.String(); s != "" {
				t.Logf("last warnings logged during the test:\n%s", s)
			}
		}
	})
	return slog.New(&dupCheck{Handler: slog.NewTextHandler(r, &slog.HandlerOptions{Level: slog.LevelWarn}), report: d, keys: map[string]bool{}})
}

// dupReport fails the test when a logger is given the same attribute key
// twice (logger.With("component", "a").With("component", "b")): JSON log
// parsers and queries by key break on such lines.
type dupReport struct {
	t    testing.TB
	mu   sync.Mutex
	done bool // the test has ended: report nothing more
}

func (d *dupReport) duplicate(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.done {
		d.t.Errorf("a logger was given the attribute %q twice", key)
	}
}

// dupCheck is a slog.Handler that reports attribute keys added twice at the
// same level of a logger (With, then With or a record's attributes).
type dupCheck struct {
	slog.Handler
	report *dupReport
	keys   map[string]bool // keys set by With since the last group
}

func (h *dupCheck) WithAttrs(attrs []slog.Attr) slog.Handler {
	keys := make(map[string]bool, len(h.keys)+len(attrs))
	for k := range h.keys {
		keys[k] = true
	}
	for _, a := range attrs {
		if keys[a.Key] {
			h.report.duplicate(a.Key)
		}
		keys[a.Key] = true
	}
	return &dupCheck{Handler: h.Handler.WithAttrs(attrs), report: h.report, keys: keys}
}

func (h *dupCheck) WithGroup(name string) slog.Handler {
	return &dupCheck{Handler: h.Handler.WithGroup(name), report: h.report, keys: map[string]bool{}}
}

func (h *dupCheck) Handle(ctx context.Context, rec slog.Record) error {
	rec.Attrs(func(a slog.Attr) bool {
		if h.keys[a.Key] {
			h.report.duplicate(a.Key)
		}
		return true
	})
	return h.Handler.Handle(ctx, rec)
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
