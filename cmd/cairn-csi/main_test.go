package main

import (
	"bufio"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/internal/testtool"
)

var build = testtool.NewBuilder(".")

func TestMain(m *testing.M) {
	code := m.Run()
	build.Remove()
	os.Exit(code)
}

// TestMetricsListenerAndLogLevel: with --metrics-listen, cairn-csi serves
// the Go runtime's metrics, its health, and its log level, which a PUT
// changes while it runs; without it, it serves nothing beside the CSI
// socket.
func TestMetricsListenerAndLogLevel(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(build.Path(t), "--mode", "controller", "--insecure",
		"--endpoint", "unix://"+filepath.Join(dir, "csi.sock"), "--mds", "127.0.0.1:1",
		"--metrics-listen", "127.0.0.1:0")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill() // by pid
		_ = cmd.Wait()
	}()
	addrs := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`msg="metrics listener" addr=(\S+)`)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addrs <- m[1]
			}
		}
	}()
	var addr string
	select {
	case addr = <-addrs:
	case <-time.After(30 * time.Second):
		t.Fatal("cairn-csi logged no metrics listener")
	}
	get := func(method, path, body string) string {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s: %s: %s", method, path, resp.Status, b)
		}
		return strings.TrimSpace(string(b))
	}
	if got := get(http.MethodGet, "/debug/loglevel", ""); got != "info" {
		t.Fatalf("log level %q, want info", got)
	}
	if got := get(http.MethodPut, "/debug/loglevel", "debug"); got != "debug" {
		t.Fatalf("log level after PUT debug: %q", got)
	}
	if got := get(http.MethodGet, "/debug/loglevel", ""); got != "debug" {
		t.Fatalf("log level %q after it was set to debug", got)
	}
	if m := get(http.MethodGet, "/metrics", ""); !strings.Contains(m, "go_goroutines") {
		t.Fatalf("/metrics has no Go runtime metrics:\n%s", m)
	}
	if h := get(http.MethodGet, "/healthz", ""); !strings.HasPrefix(h, "serving ") {
		t.Fatalf("/healthz: %q", h)
	}
}
