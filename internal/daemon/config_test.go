package daemon

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCommandLineThenConfigThenEnvironment(t *testing.T) {
	newFS := func() (*flag.FlagSet, map[string]*string) {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		v := map[string]*string{}
		for _, n := range []string{"zone", "mds", "data-dir", "listen"} {
			v[n] = fs.String(n, "default", "")
		}
		return fs, v
	}
	p := filepath.Join(t.TempDir(), "cs.yaml")
	if err := os.WriteFile(p, []byte("zone: from-file\ndata-dir: /data/cs0\nmds: [127.0.0.1:6700, 127.0.0.1:6710]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CAIRN_ZONE", "from-env")
	t.Setenv("CAIRN_DATA_DIR", "/from/env")
	t.Setenv("CAIRN_LISTEN", "127.0.0.1:9999")
	fs, v := newFS()
	if err := Parse(fs, []string{"--zone", "from-flag", "--config", p}); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"zone": "from-flag", "data-dir": "/data/cs0", "mds": "127.0.0.1:6700,127.0.0.1:6710", "listen": "127.0.0.1:9999"}
	for k, w := range want {
		if *v[k] != w {
			t.Errorf("--%s = %q, want %q", k, *v[k], w)
		}
	}
	// Unknown settings and bad values say where they came from.
	if err := os.WriteFile(p, []byte("bogus: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fs, _ = newFS()
	if err := Parse(fs, []string{"--config", p}); err == nil || !strings.Contains(err.Error(), `unknown setting "bogus"`) {
		t.Fatalf("unknown setting: %v", err)
	}
	fs = flag.NewFlagSet("t", flag.ContinueOnError)
	fs.Int("copysets", 1, "")
	t.Setenv("CAIRN_COPYSETS", "many")
	if err := Parse(fs, nil); err == nil || !strings.Contains(err.Error(), `environment CAIRN_COPYSETS="many" (--copysets)`) {
		t.Fatalf("bad environment value: %v", err)
	}
}

// TestUsageNamesFlagsAsCairnOpsDoes: a daemon's help writes its flags as
// --name TYPE with their defaults, as cairn-ops does, not Go's -name.
func TestUsageNamesFlagsAsCairnOpsDoes(t *testing.T) {
	fs := flag.NewFlagSet("cairn-test", flag.ContinueOnError)
	var out strings.Builder
	fs.SetOutput(&out)
	fs.String("data-dir", "/var/lib/x", "where the `dir`ectory is")
	fs.Bool("insecure", false, "run without TLS")
	if err := Parse(fs, []string{"--help"}); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("--help: %v", err)
	}
	got := out.String()
	for _, want := range []string{"Usage: cairn-test [flags]", "\n  --data-dir dir\n", "where the directory is (default /var/lib/x)", "\n  --insecure\n", "\n  --config string\n", "CAIRN_<FLAG>"} {
		if !strings.Contains(got, want) {
			t.Errorf("help lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "\n  -data-dir") {
		t.Errorf("help names a flag with one dash:\n%s", got)
	}
}
