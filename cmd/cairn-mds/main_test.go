package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/mds/embedetcd"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/mds/mdstest"
)

// build builds cairn-mds once per test run.
var build = testtool.NewBuilder(".")

func TestMain(m *testing.M) {
	code := m.Run()
	build.Remove()
	os.Exit(code)
}

// binary is the cairn-mds built for the tests.
func binary(t *testing.T) string { return build.Path(t) }

// proc is a running cairn-mds.
type proc struct {
	cmd     *exec.Cmd
	addr    string
	metrics string
	done    chan struct{}
	mu      sync.Mutex
	stderr  strings.Builder
}

var startedRE = regexp.MustCompile(`msg="mds started".* addr=(\S+) metrics=(\S+)`)

func startProc(t *testing.T, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(binary(t), append([]string{"--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
		"--embedded-etcd-listen", "127.0.0.1:0", "--log-level", "info", "--insecure"}, args...)...), done: make(chan struct{})}
	errPipe, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	found := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(errPipe)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.stderr.WriteString(line + "\n")
			p.mu.Unlock()
			if m := startedRE.FindStringSubmatch(line); m != nil {
				found <- [2]string{m[1], m[2]}
			}
		}
		_ = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
	})
	select {
	case m := <-found:
		p.addr, p.metrics = m[0], m[1]
	case <-p.done:
		t.Fatalf("cairn-mds exited at start: %s", p.log())
	case <-time.After(30 * time.Second):
		t.Fatalf("cairn-mds did not start: %s", p.log())
	}
	return p
}

func (p *proc) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

func (p *proc) health() string {
	resp, err := http.Get("http://" + p.metrics + "/healthz")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func waitLeader(t *testing.T, p *proc) {
	t.Helper()
	soon.Succeeds(t, 20*time.Second, func() error {
		if h := p.health(); !strings.HasPrefix(h, "ok leader") {
			return fmt.Errorf("healthz: %q", h)
		}
		return nil
	})
}

func TestServesAndShutsDownOnSIGTERM(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test")
	}
	dir := t.TempDir()
	p := startProc(t, "--data-dir", dir, "--chunk-size", "1MiB", "--segment-size", "64MiB")
	waitLeader(t, p)
	conn, err := mdsclient.Dial([]string{p.addr}, mdsclient.Options{RetryBudget: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Constants.ChunkSize != 1<<20 || st.Constants.SegmentSize != 64<<20 || len(st.Mds) != 1 || !st.Mds[0].Leader || len(st.Etcd) != 1 {
		t.Fatalf("cluster status %v", st)
	}
	_, err = conn.Volumes().CreateVolume(context.Background(), &mdspb.CreateVolumeRequest{Name: "v", Size: 1})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("create without a pool: %v, want FailedPrecondition", err)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit code %d after SIGTERM: %s", code, p.log())
	}
	// The constants are fixed: another chunk size is refused at start.
	bad := exec.Command(binary(t), "--data-dir", dir, "--listen", "127.0.0.1:0", "--metrics-listen", "-",
		"--embedded-etcd-listen", "127.0.0.1:0", "--chunk-size", "16MiB", "--insecure")
	out, err := bad.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "chunk size 16777216 was configured but the cluster was created with 1048576") {
		t.Fatalf("restart with another chunk size: %v: %s", err, out)
	}
}

func TestKilledLeaderHandsOverWithNothingLost(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test")
	}
	ctx := context.Background()
	etcd, err := embedetcd.Start(ctx, embedetcd.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer etcd.Close()
	args := []string{"--etcd-endpoints", strings.Join(etcd.Endpoints(), ","), "--election-ttl", "2s",
		"--chunk-size", "1MiB", "--segment-size", "8MiB"}
	a := startProc(t, args...)
	waitLeader(t, a)
	b := startProc(t, args...)
	if h := b.health(); !strings.HasPrefix(h, "ok follower") {
		t.Fatalf("second MDS: %q", h)
	}
	conn, err := mdsclient.Dial([]string{a.addr, b.addr}, mdsclient.Options{RetryBudget: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	consts := &mdspb.ClusterConstants{ChunkSize: 1 << 20, SegmentSize: 8 << 20, BlockSize: 512, MetaPageSize: 4096}
	for z := 0; z < 3; z++ {
		d := mdstest.StartChunkServerDouble(t, fmt.Sprintf("h%d", z), fmt.Sprintf("z%d", z), "pool0")
		if err := d.Register(ctx, conn.Topology(), consts); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := conn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp", PhysicalPool: "pool0", CopysetsPerChunkserver: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "vol", Size: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	seg, err := conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "vol", Offset: 0, Allocate: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	waitLeader(t, b)
	t.Logf("failover after SIGKILL took %s", time.Since(killed).Round(time.Millisecond))
	got, err := conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "vol", Offset: 0})
	if err != nil {
		t.Fatal(err)
	}
	if got.Segment.String() != seg.Segment.String() {
		t.Fatalf("segment after failover %v, want %v", got.Segment, seg.Segment)
	}
	if _, err := conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "vol", Offset: 8 << 20, Allocate: true}); err != nil {
		t.Fatalf("allocation on the new leader: %v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"512": 512, "1MiB": 1 << 20, "16M": 16 << 20, "1GiB": 1 << 30, "2 TiB": 2 << 40, "1.5GiB": 1536 << 20, "64mb": 64 << 20} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "x", "0.3KiB", "-1", "99999999999999TiB"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}
