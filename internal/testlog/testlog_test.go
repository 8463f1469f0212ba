package testlog

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestRingKeepsTheLastLinesInOrder(t *testing.T) {
	r := newRing(3)
	if r.String() != "" {
		t.Fatalf("empty ring = %q", r.String())
	}
	l := slog.New(slog.NewTextHandler(r, &slog.HandlerOptions{Level: slog.LevelWarn}))
	for i := range 5 {
		l.Warn(fmt.Sprintf("warning %d", i))
		l.Info("not kept")
	}
	got := r.String()
	lines := strings.Split(got, "\n")
	if len(lines) != 3 {
		t.Fatalf("ring holds %d lines, want 3:\n%s", len(lines), got)
	}
	for i, line := range lines {
		if want := fmt.Sprintf(`msg="warning %d"`, i+2); !strings.Contains(line, want) {
			t.Errorf("line %d = %q, want it to hold %s", i, line, want)
		}
	}
	if strings.Contains(got, "not kept") {
		t.Errorf("info record kept:\n%s", got)
	}
}

// fakeTB records what New prints when the test fails.
type fakeTB struct {
	testing.TB
	failed   bool
	cleanups []func()
	logged   []string
}

func (f *fakeTB) Cleanup(fn func()) { f.cleanups = append(f.cleanups, fn) }
func (f *fakeTB) Failed() bool      { return f.failed }
func (f *fakeTB) Logf(format string, args ...any) {
	f.logged = append(f.logged, fmt.Sprintf(format, args...))
}
func (f *fakeTB) Helper() {}

func TestNewPrintsWarningsOnlyWhenTheTestFails(t *testing.T) {
	t.Setenv("CAIRN_TEST_LOG", "")
	for _, failed := range []bool{false, true} {
		f := &fakeTB{failed: failed}
		New(f).Warn("replica lagging", "copyset", "1-2")
		for _, c := range f.cleanups {
			c()
		}
		printed := strings.Join(f.logged, "\n")
		if failed != strings.Contains(printed, `msg="replica lagging" copyset=1-2`) {
			t.Errorf("failed=%v: printed %q", failed, printed)
		}
	}
}
