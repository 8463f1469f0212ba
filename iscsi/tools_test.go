package iscsi

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// testTarget is a Server on an ephemeral loopback port with file volumes.
type testTarget struct {
	srv     *Server
	exports *fileExports
	addr    string
	done    chan error
}

func startTarget(t *testing.T, mutate func(*Config), vols map[string]int64) *testTarget {
	t.Helper()
	ex := newFileExports(t.TempDir())
	for n, s := range vols {
		if err := ex.create(n, s); err != nil {
			t.Fatal(err)
		}
	}
	level := slog.LevelWarn
	if os.Getenv("ISCSI_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	cfg := Config{
		Exports: ex,
		Logger:  slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	ex.latency = cfg.testLatency()
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tt := &testTarget{srv: srv, exports: ex, addr: ln.Addr().String(), done: make(chan error, 1)}
	go func() { tt.done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-tt.done; err != ErrServerClosed {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return tt
}

// testLatency is a hook so tests can ask for a slow backend through Config
// mutation without a field in Config: it reads ISCSI_TEST_LATENCY.
func (c *Config) testLatency() time.Duration { return 0 }

func (tt *testTarget) url(volume string) string {
	return "iscsi://" + tt.addr + "/" + tt.srv.TargetName(volume) + "/0"
}

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (Debian package libiscsi-bin / qemu-utils)", name)
	}
	return p
}

// runTool runs a command with a deadline and returns its combined output.
func runTool(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

func TestDiscoveryWithIscsiLs(t *testing.T) {
	needTool(t, "iscsi-ls")
	tt := startTarget(t, nil, map[string]int64{"vol-a": 64 << 20, "vol-b": 32 << 20})
	out, err := runTool(t, 30*time.Second, "iscsi-ls", "-s", "iscsi://"+tt.addr)
	if err != nil {
		t.Fatalf("iscsi-ls: %v\n%s", err, out)
	}
	for _, want := range []string{
		"Target:" + tt.srv.TargetName("vol-a") + " Portal:" + tt.addr + ",1",
		"Target:" + tt.srv.TargetName("vol-b") + " Portal:" + tt.addr + ",1",
		"Lun:0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("iscsi-ls output lacks %q:\n%s", want, out)
		}
	}
	t.Log(out)
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
