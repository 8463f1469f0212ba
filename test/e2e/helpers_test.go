package e2e

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/tools/playground"
)

// binDir holds the binaries built for the tests ("" in -short mode).
var binDir string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "cairn-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	args := []string{"build", "-o", dir + "/"}
	for _, b := range []string{"cairn-mds", "cairn-chunkserver", "cairn-gateway", "cairn-playground", "cairn-ops", "cairn-csi"} {
		args = append(args, "cairn.io/cairn/cmd/"+b)
	}
	build := exec.Command("go", args...)
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build the binaries:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// syncBuffer is a bytes.Buffer safe for a process's output and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// pgProcess is a cairn-playground process.
type pgProcess struct {
	dir    string
	base   int
	cmd    *exec.Cmd
	out    *syncBuffer
	exited chan struct{}
	err    error // exit status, once exited is closed
}

// startPlayground runs cairn-playground on dir and base port (with extra
// flags) and waits until its state file says it is ready.
func startPlayground(t *testing.T, dir string, base int, extra ...string) *pgProcess {
	t.Helper()
	p := &pgProcess{dir: dir, base: base, out: &syncBuffer{}, exited: make(chan struct{})}
	args := append([]string{"--dir", dir, "--base-port", strconv.Itoa(base),
		"--pool-size", "64MiB", "--pool-max", "2GiB", "--pool-reserve", "512MiB", "--stop-timeout", "30s"}, extra...)
	p.cmd = exec.Command(filepath.Join(binDir, "cairn-playground"), args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	// If the test process dies, the playground stops (and its children
	// with it).
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if st, err := playground.ReadState(dir); err == nil && st.Ready && st.PID == p.cmd.Process.Pid {
			return p
		}
		select {
		case <-p.exited:
			t.Fatalf("cairn-playground exited while starting (%v):\n%s", p.err, p.out.String())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stop(t)
			t.Fatalf("playground not ready after 3 minutes:\n%s", p.out.String())
		}
	}
}

// stop sends SIGTERM and waits for a clean exit: exit status 0, no child
// left running, no state file.
func (p *pgProcess) stop(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
		return
	default:
	}
	st, _ := playground.ReadState(p.dir)
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(2 * time.Minute):
		_ = p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("cairn-playground did not stop within 2 minutes of SIGTERM:\n%s", p.out.String())
		return
	}
	if p.err != nil {
		t.Errorf("cairn-playground exited with %v:\n%s", p.err, p.out.String())
	}
	if st != nil {
		for _, c := range st.Processes {
			if c.PID != 0 && syscall.Kill(c.PID, 0) == nil {
				t.Errorf("%s (pid %d) still runs after the playground stopped", c.Name, c.PID)
			}
		}
	}
	if _, err := playground.ReadState(p.dir); !errors.Is(err, playground.ErrNotRunning) {
		t.Errorf("state file left after a clean stop: %v", err)
	}
}

// state reads the running playground's state file.
func (p *pgProcess) state(t *testing.T) *playground.State {
	t.Helper()
	st, err := playground.ReadState(p.dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// logTails returns the end of every child's log, for failure reports.
func (p *pgProcess) logTails() string {
	var b strings.Builder
	b.WriteString("playground output:\n" + p.out.String())
	logs, _ := filepath.Glob(filepath.Join(p.dir, "logs", "*.log"))
	for _, l := range logs {
		data, _ := os.ReadFile(l)
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 25 {
			lines = lines[len(lines)-25:]
		}
		fmt.Fprintf(&b, "\n--- %s (last %d lines)\n%s\n", l, len(lines), strings.Join(lines, "\n"))
	}
	return b.String()
}

// checkImage compares the start of the file at path with want byte for
// byte and checks that the rest holds no data: nbdcopy leaves zero blocks
// as holes, so a data extent past want means non-zero bytes were read.
func checkImage(t *testing.T, path string, want []byte, size int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size {
		t.Fatalf("%s is %d bytes, want %d", path, st.Size(), size)
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(f, got); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("%s differs from what was written at byte %d (%#x)", path, i, i)
	}
	if int64(len(want)) == size {
		return
	}
	// Every data extent past want must read as zeros.
	buf := make([]byte, 1<<20)
	for pos := int64(len(want)); pos < size; {
		start, err := unix.Seek(int(f.Fd()), pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return // only holes up to the end
		}
		if err != nil {
			t.Fatal(err)
		}
		end, err := unix.Seek(int(f.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		for off := start; off < end; off += int64(len(buf)) {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), end-off)], off)
			if err != nil && err != io.EOF {
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:n], make([]byte, n)) {
				t.Fatalf("%s has non-zero data near %d, past the %d bytes written", path, off, len(want))
			}
		}
		pos = end
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func httpGet(url string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// diskUsage sums the blocks allocated to the files under dir.
func diskUsage(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

// opsArgs are cairn-ops's connection flags for the playground st: its
// MDS and its operator certificate.
func opsArgs(st *playground.State) []string {
	return append([]string{"--mds", st.MDS}, st.TLS.Flags()...)
}

// dialMDS connects to the playground's MDS as its operator.
func dialMDS(t *testing.T, st *playground.State) *mdsclient.Conn {
	t.Helper()
	var id *certs.Source
	if st.TLS != nil {
		var err error
		if id, err = certs.Load(st.TLS.Files(), nil); err != nil {
			t.Fatal(err)
		}
	}
	conn, err := mdsclient.Dial([]string{st.MDS}, mdsclient.Options{Logger: slog.New(slog.DiscardHandler), TLS: id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}
