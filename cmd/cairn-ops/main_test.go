package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/mds"
	"cairn.io/cairn/tools/ops"
)

// binPath is the cairn-ops binary TestMain builds.
var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cairn-ops-bin")
	if err != nil {
		panic(err)
	}
	binPath = filepath.Join(dir, "cairn-ops")
	if out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput(); err != nil {
		_ = os.RemoveAll(dir)
		panic("go build: " + err.Error() + ": " + string(out))
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// run runs the binary with extra environment variables.
func run(t *testing.T, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, args...)
	cmd.Env = append(os.Environ(), append([]string{"CAIRN_INSECURE=1"}, env...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// TestExitCodesReachTheShell runs the binary: the exit code, the JSON on
// stdout and the error line on stderr are what scripts see.
func TestExitCodesReachTheShell(t *testing.T) {
	s, err := mds.New(mds.Config{DataDir: t.TempDir(), ListenAddr: "127.0.0.1:0", MetricsAddr: "-",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)

	// A cluster without chunkservers or pools is not healthy: exit 3, with
	// the reasons in the JSON report. The address comes from CAIRN_MDS.
	var stdout, stderr string
	var code int
	deadline := time.Now().Add(20 * time.Second)
	for {
		stdout, stderr, code = run(t, []string{ops.EnvMDS + "=" + s.Addr()}, "-o", "json", "status")
		if code != ops.ExitUnreachable || time.Now().After(deadline) {
			break // the MDS answers once it leads
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code != ops.ExitUnhealthy {
		t.Fatalf("status: exit %d, want %d\n%s%s", code, ops.ExitUnhealthy, stdout, stderr)
	}
	var report struct {
		Healthy  bool     `json:"healthy"`
		Problems []string `json:"problems"`
	}
	if err := json.Unmarshal([]byte(stdout), &report); err != nil {
		t.Fatalf("status output: %v\n%s", err, stdout)
	}
	if report.Healthy || len(report.Problems) != 2 || stderr != "" {
		t.Errorf("status: %+v, stderr %q", report, stderr)
	}

	stdout, stderr, code = run(t, nil, "--mds", s.Addr(), "query", "volume", "nope")
	if code != ops.ExitNotFound || stdout != "" || stderr != "cairn-ops: volume \"nope\" does not exist\n" {
		t.Errorf("query unknown volume: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}

	_, stderr, code = run(t, nil, "--mds", "127.0.0.1:1", "--timeout", "300ms", "list", "zone")
	if code != ops.ExitUnreachable || !strings.Contains(stderr, "no MDS leader answered (tried 127.0.0.1:1)") {
		t.Errorf("unreachable MDS: exit %d, stderr %q", code, stderr)
	}

	_, _, code = run(t, nil, "list", "frobs")
	if code != ops.ExitUsage {
		t.Errorf("usage error: exit %d", code)
	}
}
