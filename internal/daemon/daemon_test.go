package daemon

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

func TestLogger(t *testing.T) {
	var b bytes.Buffer
	l, err := Logger(&b, "warn")
	if err != nil {
		t.Fatal(err)
	}
	l.Info("hidden")
	l.Warn("shown")
	if strings.Contains(b.String(), "hidden") || !strings.Contains(b.String(), "shown") {
		t.Fatalf("log %q", b.String())
	}
	if _, err := Logger(&b, "loud"); err == nil || !strings.Contains(err.Error(), "--log-level") {
		t.Fatalf("bad level: %v", err)
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
