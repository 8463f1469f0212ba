package main

import (
	"bufio"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/csi/attach"
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

// TestAttachISCSIRefusedWithoutTheInitiator: cairn-csi --mode node
// --attach iscsi on a machine whose kernel has no iSCSI initiator (this
// project's: no iscsi_tcp module) exits at once, saying what is missing
// and what to do; the former name of --reattach-timeout is still taken.
// The attach subcommand refuses an iscsi takeover of another mode.
func TestAttachISCSIRefusedWithoutTheInitiator(t *testing.T) {
	why := attach.ISCSIUnavailable(attach.DefaultISCSIAdm)
	if why == nil {
		t.Skip("the iscsi attach can run here: its refusal is not shown")
	}
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--mode", "node", "--insecure", "--node-id", "n", "--state-dir", filepath.Join(dir, "state"),
			"--endpoint", "unix://" + filepath.Join(dir, "csi.sock"), "--mds", "127.0.0.1:1", "--attach", "iscsi", "--nbd-reattach-timeout", "1m"},
			"cairn-csi: csi: --attach iscsi: " + why.Error()},
		{[]string{"attach", "--insecure", "--dir", dir, "--volume", "v", "--node-id", "n", "--mds", "127.0.0.1:1",
			"--attach", "fuse", "--iscsi-takeover", "iqn.2026-11.io.cairn.csi:v.0"},
			"cairn-csi: --iscsi-takeover goes with --attach iscsi"},
	} {
		cmd := exec.Command(build.Path(t), c.args...)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || strings.TrimSpace(string(out)) != c.want {
			t.Errorf("cairn-csi %s: %v\n%s\nwant exit status 1 and %q", strings.Join(c.args, " "), err, out, c.want)
		}
	}
}
