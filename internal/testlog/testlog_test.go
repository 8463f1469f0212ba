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
func (f *fakeTB) Errorf(format string, args ...any) {
	f.failed = true
	f.Logf(format, args...)
}

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

func TestDuplicateAttributeKeysFailTheTest(t *testing.T) {
	t.Setenv("CAIRN_TEST_LOG", "")
	ft := &fakeTB{TB: t}
	l := New(ft)
	l.With("component", "a").With("volume", "v").Warn("fine")
	if ft.failed {
		t.Fatal("distinct keys failed the test")
	}
	l.With("component", "a").With("component", "b").Info("twice")
	if !ft.failed {
		t.Fatal("a key given twice by With did not fail the test")
	}
	ft2 := &fakeTB{TB: t}
	New(ft2).With("volume", "v").Warn("and again", "volume", "w")
	if !ft2.failed {
		t.Fatal("a record repeating a With key did not fail the test")
	}
	ft3 := &fakeTB{TB: t}
	New(ft3).With("k", 1).WithGroup("g").With("k", 2).Warn("grouped")
	if ft3.failed {
		t.Fatal("the same key inside a group failed the test")
	}
}
