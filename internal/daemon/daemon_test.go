package daemon

import (
	"bytes"
	"encoding/json"
	"flag"
	"log/slog"
	"reflect"
	"strings"
	"testing"
)

func TestLogger(t *testing.T) {
	logger := func(args ...string) (*slog.Logger, *bytes.Buffer, error) {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		lf := AddLogFlags(fs)
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		l, err := lf.Logger(&b)
		return l, &b, err
	}
	l, b, err := logger("--log-level", "warn")
	if err != nil {
		t.Fatal(err)
	}
	l.Info("hidden")
	l.Warn("shown")
	if strings.Contains(b.String(), "hidden") || !strings.Contains(b.String(), "shown") {
		t.Fatalf("log %q", b.String())
	}
	// The level changes while the process runs.
	LogLevel.Set(slog.LevelDebug)
	l.Debug("now shown")
	if !strings.Contains(b.String(), "now shown") {
		t.Fatalf("log after lowering the level: %q", b.String())
	}
	if _, _, err := logger("--log-level", "loud"); err == nil || !strings.Contains(err.Error(), "--log-level") {
		t.Fatalf("bad level: %v", err)
	}
	// JSON, one object per line; the environment gives the default.
	t.Setenv("CAIRN_LOG_FORMAT", "json")
	l, b, err = logger()
	if err != nil {
		t.Fatal(err)
	}
	l.Info("hello", "component", "x")
	var m map[string]any
	if err := json.Unmarshal(b.Bytes(), &m); err != nil || m["msg"] != "hello" || m["component"] != "x" {
		t.Fatalf("json log %q: %v", b.String(), err)
	}
	if _, _, err := logger("--log-format", "xml"); err == nil || !strings.Contains(err.Error(), "--log-format") {
		t.Fatalf("bad format: %v", err)
	}
}

func TestEnvAndLists(t *testing.T) {
	t.Setenv("CAIRN_DAEMON_TEST", "")
	if EnvOr("CAIRN_DAEMON_TEST", "d") != "d" {
		t.Fatal("empty variable did not give the default")
	}
	t.Setenv("CAIRN_DAEMON_TEST", "v")
	if EnvOr("CAIRN_DAEMON_TEST", "d") != "v" {
		t.Fatal("variable ignored")
	}
	if got := SplitList(" a, ,b ,"); !reflect.DeepEqual(got, []string{"a", "b"}) {
		t.Fatalf("SplitList: %q", got)
	}
	if SplitList("") != nil {
		t.Fatal("empty list")
	}
}
