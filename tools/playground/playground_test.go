package playground

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
)

func TestPortsFrom(t *testing.T) {
	p, err := PortsFrom(20000, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.validate(3); err != nil {
		t.Fatal(err)
	}
	want := Ports{MDS: 20000, MDSMetrics: 20001, Etcd: 20002, ChunkServer: []int{20010, 20011, 20012},
		ChunkServerMetrics: []int{20020, 20021, 20022}, NBD: 20030, ISCSI: 20031, GatewayMetrics: 20032}
	if fmt.Sprint(p) != fmt.Sprint(want) {
		t.Fatalf("PortsFrom(20000) = %+v, want %+v", p, want)
	}
	for _, base := range []int{0, 80, 65535 - PortSpan + 2} {
		if _, err := PortsFrom(base, 3); err == nil {
			t.Errorf("PortsFrom(%d) accepted", base)
		}
	}
	if err := DefaultPorts(3).validate(3); err != nil {
		t.Fatal(err)
	}
	dup := DefaultPorts(3)
	dup.NBD = dup.MDS
	if err := dup.validate(3); err == nil || !strings.Contains(err.Error(), "both use port 6700") {
		t.Errorf("duplicate port: %v", err)
	}
}

// freeBase finds a base port whose whole span is free right now.
func freeBase(t *testing.T) int {
	t.Helper()
	base, err := FindFreeBase(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	return base
}

// TestCheckPortsNamesTheHolder: a taken port is reported with its use and
// the process that holds it.
func TestCheckPortsNamesTheHolder(t *testing.T) {
	p, _ := PortsFrom(freeBase(t), 3)
	ln, err := net.Listen("tcp", loopback(p.ISCSI))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = checkPorts(p)
	if !errors.Is(err, ErrPortInUse) {
		t.Fatalf("checkPorts: %v, want ErrPortInUse", err)
	}
	for _, want := range []string{strconv.Itoa(p.ISCSI) + " (gateway iSCSI)", "pid " + strconv.Itoa(os.Getpid()), "--base-port"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if strings.Contains(err.Error(), strconv.Itoa(p.NBD)) {
		t.Errorf("error names a free port: %v", err)
	}
}

// fakeBinDir makes a directory with the binaries New looks for; they are
// shell scripts running sleep, enough for the checks that run no cluster.
func fakeBinDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, b := range Binaries {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\nexec sleep 1000\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestNewChecksBinariesAndLocksTheDirectory(t *testing.T) {
	dir := t.TempDir()
	_, err := New(Config{Dir: dir, BinDir: t.TempDir(), Logger: testlog.New(t)})
	if err == nil || !strings.Contains(err.Error(), "cairn-mds not found") {
		t.Fatalf("New without binaries: %v", err)
	}
	bin := fakeBinDir(t)
	pg, err := New(Config{Dir: dir, BinDir: bin, Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	if running, _, err := Running(dir); err != nil || !running {
		t.Errorf("Running while a playground holds the directory: %v, %v", running, err)
	}
	if _, err := New(Config{Dir: dir, BinDir: bin, Logger: testlog.New(t)}); err == nil || !strings.Contains(err.Error(), "another playground runs") {
		t.Fatalf("second New on one directory: %v", err)
	}
	pg.Stop()
	if running, _, err := Running(dir); err != nil || running {
		t.Errorf("Running after Stop: %v, %v", running, err)
	}
	pg2, err := New(Config{Dir: dir, BinDir: bin, Logger: testlog.New(t)})
	if err != nil {
		t.Fatalf("New after the first stopped: %v", err)
	}
	pg2.Stop()
	if _, err := New(Config{Dir: dir, BinDir: bin, PoolSize: 2 << 30, PoolMax: 1 << 30, Logger: testlog.New(t)}); err == nil {
		t.Error("pool max below pool size accepted")
	}
	if _, err := ReadState(t.TempDir()); !errors.Is(err, ErrNotRunning) {
		t.Errorf("ReadState of an empty directory: %v, want ErrNotRunning", err)
	}
}

// testPlayground is a Playground with no cluster, for exercising the
// supervision of arbitrary commands.
func testPlayground(t *testing.T) *Playground {
	t.Helper()
	pg := &Playground{dir: t.TempDir(), log: testlog.New(t), failed: make(chan struct{}), ports: DefaultPorts(3)}
	pg.mu.ready = true
	return pg
}

func testChild(pg *Playground, name string, script string) *child {
	c := newChild(pg, name, "/bin/sh", []string{"-c", script}, ProcessState{Log: filepath.Join(pg.dir, name+".log")})
	pg.children = append(pg.children, c)
	return c
}

func pidOf(c *child) int { return c.snapshot().PID }

// TestKilledChildIsRestarted: a child killed with SIGKILL comes back with a
// new pid, its restart is counted and logged to its log file's header.
func TestKilledChildIsRestarted(t *testing.T) {
	pg := testPlayground(t)
	c := testChild(pg, "sleeper", "echo $((6*7)); exec sleep 1000")
	c.launch()
	defer c.stop(5 * time.Second)
	// Wait for the first output, not just the pid: a child killed before its
	// shell ran echo would leave one "42" in the log, not two.
	soon.True(t, 5*time.Second, "the child's output", func() bool {
		b, _ := os.ReadFile(c.logPath)
		return pidOf(c) != 0 && strings.Count(string(b), "\n42\n") == 1
	})
	first := pidOf(c)
	if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	soon.True(t, 10*time.Second, "the child to be restarted", func() bool { p := pidOf(c); return p != 0 && p != first })
	if st := c.snapshot(); st.Restarts != 1 {
		t.Errorf("restarts = %d, want 1", st.Restarts)
	}
	soon.True(t, 5*time.Second, "the restarted child's output", func() bool {
		b, _ := os.ReadFile(c.logPath)
		return strings.Count(string(b), "\n42\n") == 2 && strings.Count(string(b), "=== ") == 2
	})
	if pg.Err() != nil {
		t.Fatalf("playground failed: %v", pg.Err())
	}
}

// TestStopEscalatesToSIGKILL: a child that ignores SIGTERM is killed after
// the stop timeout; one that honours it is not waited for.
func TestStopEscalatesToSIGKILL(t *testing.T) {
	pg := testPlayground(t)
	stubborn := testChild(pg, "stubborn", `trap "" TERM; echo ready; while :; do sleep 0.05; done`)
	polite := testChild(pg, "polite", "exec sleep 1000")
	stubborn.launch()
	polite.launch()
	soon.True(t, 5*time.Second, "the children to start", func() bool {
		b, _ := os.ReadFile(stubborn.logPath)
		// A line of its own: the log's header quotes the script, which
		// names the word too.
		return pidOf(polite) != 0 && strings.Contains(string(b), "\nready\n")
	})
	start := time.Now()
	polite.stop(10 * time.Second)
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("stopping a child that honours SIGTERM took %s", d)
	}
	pid := pidOf(stubborn)
	start = time.Now()
	stubborn.stop(500 * time.Millisecond)
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("a child ignoring SIGTERM was stopped in %s, before the timeout", d)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("child %d still exists after stop: %v", pid, err)
	}
	if polite.snapshot().Restarts != 0 || stubborn.snapshot().Restarts != 0 {
		t.Error("a stopped child was counted as restarted")
	}
}

// TestChildDyingWhileStartingFails: before the playground is ready an exit
// is fatal and the error carries the end of the child's log.
func TestChildDyingWhileStartingFails(t *testing.T) {
	pg := testPlayground(t)
	pg.mu.ready = false
	c := testChild(pg, "broken", "echo 'flag provided but not defined: -frobnicate' >&2; exit 2")
	c.launch()
	select {
	case <-pg.Failed():
	case <-time.After(10 * time.Second):
		t.Fatal("playground did not fail")
	}
	err := pg.Err()
	for _, want := range []string{"broken exited while the playground was starting", "exit status 2", "-frobnicate"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %q", err, want)
		}
	}
	c.stop(time.Second)
	if c.snapshot().Restarts != 0 {
		t.Error("child restarted while the playground was starting")
	}
}

// TestStopBeforeLaunch: stopping children that never started returns at
// once and they never start afterwards.
func TestStopBeforeLaunch(t *testing.T) {
	pg := testPlayground(t)
	c := testChild(pg, "never", "exec sleep 1000")
	done := make(chan struct{})
	go func() { c.stop(time.Second); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("stop of a child never launched hangs")
	}
	c.launch()
	if running, _ := c.running(); running || pidOf(c) != 0 {
		t.Error("a stopped child started")
	}
}

// TestFindFreeBaseAvoidsEphemeralPorts: the range found is free and lies
// outside the kernel's ephemeral ports.
func TestFindFreeBaseAvoidsEphemeralPorts(t *testing.T) {
	lo, hi := ephemeralRange()
	for _, seed := range []int{0, 1, os.Getpid(), -7} {
		base, err := FindFreeBase(seed)
		if err != nil {
			t.Fatal(err)
		}
		if base+PortSpan > lo && base <= hi {
			t.Errorf("seed %d: base %d overlaps the ephemeral range %d-%d", seed, base, lo, hi)
		}
		p, _ := PortsFrom(base, 3)
		if err := checkPorts(p); err != nil {
			t.Errorf("seed %d: %v", seed, err)
		}
	}
}

// TestLogFormatReachesChildren: the playground's log format is every
// process's (and the log level with it), and a JSON log's start line is a JSON object too; a format
// other than text or json is refused before anything is set up.
func TestLogFormatReachesChildren(t *testing.T) {
	bin := fakeBinDir(t)
	if _, err := New(Config{Dir: t.TempDir(), BinDir: bin, Insecure: true, LogFormat: "xml", Logger: testlog.New(t)}); err == nil || !strings.Contains(err.Error(), `log format "xml"`) {
		t.Fatalf("New with log format xml: %v", err)
	}
	dir := t.TempDir()
	pg, err := New(Config{Dir: dir, BinDir: bin, Insecure: true, LogFormat: "json", LogLevel: "debug", Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Stop()
	if len(pg.children) != 5 {
		t.Fatalf("%d children, want the MDS, three chunkservers and the gateway", len(pg.children))
	}
	for _, c := range pg.children {
		if args := strings.Join(c.args, " "); !strings.HasSuffix(args, " --log-format json --log-level debug") {
			t.Errorf("%s: %s, want --log-format json --log-level debug", c.name, args)
		}
	}
	line := startLine("json", time.Unix(1_700_000_000, 0), "/bin/cairn-mds", []string{"--log-format", "json"})
	var rec map[string]any
	if err := json.Unmarshal([]byte(line), &rec); err != nil || !strings.HasSuffix(line, "}\n") {
		t.Fatalf("JSON start line %q: %v", line, err)
	}
	if rec["msg"] != "process started by the playground" || fmt.Sprint(rec["command"]) != "[/bin/cairn-mds --log-format json]" {
		t.Errorf("JSON start line %v", rec)
	}
	if text := startLine("text", time.Unix(1_700_000_000, 0), "/bin/cairn-mds", nil); !strings.HasPrefix(text, "=== ") {
		t.Errorf("text start line %q", text)
	}
}
