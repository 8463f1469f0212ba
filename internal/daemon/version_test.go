package daemon

import (
	"runtime"
	"strings"
	"testing"
)

func TestVersionRequested(t *testing.T) {
	for _, c := range []struct {
		args []string
		want bool
	}{
		{[]string{"--version"}, true},
		{[]string{"-version"}, true},
		{[]string{"--log-level", "info", "--version"}, true},
		{[]string{"--log-level", "info"}, false},
		{[]string{"--", "--version"}, false},
		{nil, false},
	} {
		if got := versionRequested(c.args); got != c.want {
			t.Errorf("versionRequested(%q) = %v, want %v", c.args, got, c.want)
		}
	}
	if v := Version(); !strings.HasPrefix(v, "commit ") || !strings.Contains(v, runtime.Version()) {
		t.Errorf("Version() = %q", v)
	}
}
