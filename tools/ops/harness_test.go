package ops

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/mds/mdstest"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// Small cluster constants keep test segments cheap: 8 chunks of 1 MiB.
var testConstants = &mdspb.ClusterConstants{ChunkSize: 1 << 20, SegmentSize: 8 << 20, BlockSize: 512, MetaPageSize: 4096}

// testMDSConfig is an MDS config with ephemeral ports and short timeouts.
func testMDSConfig(t testing.TB, dir string) mds.Config {
	return mds.Config{
		DataDir:            dir,
		ListenAddr:         "127.0.0.1:0",
		MetricsAddr:        "-",
		ElectionTTL:        2 * time.Second,
		HeartbeatInterval:  100 * time.Millisecond,
		UnstableTimeout:    4 * time.Second,
		OfflineTimeout:     6 * time.Second,
		SessionLease:       30 * time.Second,
		BackgroundInterval: 100 * time.Millisecond,
		RPCTimeout:         2 * time.Second,
		Constants:          testConstants,
		Logger:             testlog.New(t),
		// Doubles carry out no operator: balance moves would only wait.
		Schedule: mds.ScheduleConfig{NoBalance: true},
	}
}

// doubleCluster is a real in-process MDS with chunkserver doubles
// (mdstest.ChunkServerDouble: no data, no Raft) standing in for
// chunkservers, one per zone.
type doubleCluster struct {
	t    *testing.T
	ctx  context.Context
	mds  *mds.Server
	conn *mdsclient.Conn
	css  []*mdstest.ChunkServerDouble

	mu struct {
		sync.Mutex
		// silent doubles send no heartbeats.
		silent map[int]bool
	}
	// labels maps loopback ports to fixed-width names for golden files.
	labels map[string]string
}

// newDoubleCluster starts an MDS and n chunkserver doubles in n zones
// ("zone-0"...) of physical pool "pool0", registered, with a heartbeat loop.
func newDoubleCluster(t *testing.T, n int) *doubleCluster {
	t.Helper()
	return newDoubleClusterWith(t, n, nil)
}

// newDoubleClusterWith is newDoubleCluster with the MDS's config changed by
// configure (nil: as is).
func newDoubleClusterWith(t *testing.T, n int, configure func(*mds.Config)) *doubleCluster {
	t.Helper()
	ctx := context.Background()
	cfg := testMDSConfig(t, t.TempDir())
	if configure != nil {
		configure(&cfg)
	}
	s, err := mds.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	soon.Succeeds(t, 20*time.Second, func() error {
		if !s.Leading() {
			return fmt.Errorf("MDS not leading yet")
		}
		return nil
	})
	conn, err := mdsclient.Dial([]string{s.Addr()}, mdsclient.Options{Logger: testlog.New(t), RetryBudget: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	c := &doubleCluster{t: t, ctx: ctx, mds: s, conn: conn, labels: map[string]string{}}
	c.mu.silent = map[int]bool{}
	c.label(s.Addr(), "mds00")
	for _, ep := range s.EtcdEndpoints() {
		c.label(strings.TrimPrefix(strings.TrimPrefix(ep, "http://"), "https://"), "etcd0")
	}
	for i := range n {
		d := mdstest.StartChunkServerDouble(t, fmt.Sprintf("host-%d", i), fmt.Sprintf("zone-%d", i), "pool0")
		d.SetCapacity(&mdspb.Capacity{
			DiskTotalBytes: 100 << 30, DiskFreeBytes: 60 << 30,
			PoolFreeChunks: 900, PoolUsedChunks: 100, PoolTargetChunks: 1000, FormatPercent: 100, PoolGrowableChunks: 2000,
		})
		if err := d.Register(ctx, conn.Topology(), testConstants); err != nil {
			t.Fatal(err)
		}
		c.css = append(c.css, d)
		c.label(d.Addr, fmt.Sprintf("cs%d__", d.ID()))
	}
	c.heartbeatLoop()
	c.waitOnline()
	return c
}

func (c *doubleCluster) label(addr, name string) {
	_, port, _ := strings.Cut(addr, ":")
	c.labels[port] = name
}

// heartbeatLoop heartbeats every double that is not silent until the test
// ends.
func (c *doubleCluster) heartbeatLoop() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	c.t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			for i, d := range c.css {
				c.mu.Lock()
				silent := c.mu.silent[i]
				c.mu.Unlock()
				if !silent {
					_, _ = d.Heartbeat(ctx, c.conn.Heartbeats())
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
}

// setSilent stops (or restarts) the heartbeats of double i.
func (c *doubleCluster) setSilent(i int, silent bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.silent[i] = silent
}

func (c *doubleCluster) waitOnline() {
	c.t.Helper()
	soon.Succeeds(c.t, 10*time.Second, func() error {
		resp, err := c.conn.Topology().ListChunkServers(c.ctx, &mdspb.ListChunkServersRequest{})
		if err != nil {
			return err
		}
		for _, cs := range resp.Chunkservers {
			if cs.OnlineState != mdspb.OnlineState_ONLINE_STATE_ONLINE {
				return fmt.Errorf("chunkserver %d is %s", cs.Id, cs.OnlineState)
			}
		}
		return nil
	})
}

// createPool creates logical pool "lp0" through cairn-ops and makes the
// first double lead every copyset, waiting until the MDS records it.
func (c *doubleCluster) createPool(perCS int) {
	c.t.Helper()
	c.mustRun("create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", strconv.Itoa(perCS))
	c.leadAll(0)
}

// leadAll makes double i report itself leader of every copyset it hosts and
// the others followers, and waits for the MDS to record it.
func (c *doubleCluster) leadAll(i int) {
	c.t.Helper()
	for j, d := range c.css {
		for _, spec := range d.Copysets() {
			d.SetLeading(spec.Copyset, j == i, 1)
		}
	}
	want := c.css[i].ID()
	soon.Succeeds(c.t, 10*time.Second, func() error {
		resp, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
		if err != nil {
			return err
		}
		for _, cs := range resp.Copysets {
			if cs.LeaderId != want {
				return fmt.Errorf("copyset %s led by %d", cs.Id.Name(), cs.LeaderId)
			}
		}
		return nil
	})
}

// runResult is one cairn-ops run.
type runResult struct {
	stdout, stderr string
	code           int
}

// run runs cairn-ops against the cluster's MDS with stdin.
func (c *doubleCluster) runIn(stdin string, args ...string) runResult {
	return runOps(c.t, stdin, append([]string{"--mds", c.mds.Addr(), "--timeout", "10s"}, args...)...)
}

func (c *doubleCluster) run(args ...string) runResult { return c.runIn("", args...) }

// mustRun runs cairn-ops and fails the test unless it exits 0.
func (c *doubleCluster) mustRun(args ...string) runResult {
	c.t.Helper()
	r := c.run(args...)
	if r.code != ExitOK {
		c.t.Fatalf("cairn-ops %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// jsonRun runs cairn-ops with -o json, checks the exit code and decodes
// stdout.
func (c *doubleCluster) jsonRun(wantCode int, args ...string) map[string]any {
	c.t.Helper()
	r := c.run(append([]string{"-o", "json"}, args...)...)
	if r.code != wantCode {
		c.t.Fatalf("cairn-ops -o json %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, wantCode, r.stdout, r.stderr)
	}
	return decodeJSON(c.t, r.stdout)
}

func runOps(t *testing.T, stdin string, args ...string) runResult {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if len(args) > 0 && !slices.Contains(args, "--tls-cert") {
		// The in-process clusters of these tests run without TLS.
		args = append([]string{"--insecure"}, args...)
	}
	code := RunWithInput(ctx, args, strings.NewReader(stdin), &out, &errb)
	return runResult{stdout: out.String(), stderr: errb.String(), code: code}
}

func decodeJSON(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatalf("output is not a JSON object: %v\n%s", err, s)
	}
	return m
}

// jget walks a decoded JSON value by a dotted path of keys and indexes
// ("copysets.unhealthy_copysets.0.reasons") and fails the test when a step
// is missing.
func jget(t *testing.T, v any, path string) any {
	t.Helper()
	cur := v
	for _, step := range strings.Split(path, ".") {
		switch x := cur.(type) {
		case map[string]any:
			next, ok := x[step]
			if !ok {
				t.Fatalf("JSON path %q: no key %q in %v", path, step, keys(x))
			}
			cur = next
		case []any:
			i, err := strconv.Atoi(step)
			if err != nil || i < 0 || i >= len(x) {
				t.Fatalf("JSON path %q: bad index %q into %d elements", path, step, len(x))
			}
			cur = x[i]
		default:
			t.Fatalf("JSON path %q: cannot take %q of %T", path, step, cur)
		}
	}
	return cur
}

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// jnum reads a JSON number as uint64.
func jnum(t *testing.T, v any, path string) uint64 {
	t.Helper()
	f, ok := jget(t, v, path).(float64)
	if !ok {
		t.Fatalf("JSON path %q: %v is not a number", path, jget(t, v, path))
	}
	return uint64(f)
}

func jstr(t *testing.T, v any, path string) string {
	t.Helper()
	s, ok := jget(t, v, path).(string)
	if !ok {
		t.Fatalf("JSON path %q: %v is not a string", path, jget(t, v, path))
	}
	return s
}

func jbool(t *testing.T, v any, path string) bool {
	t.Helper()
	b, ok := jget(t, v, path).(bool)
	if !ok {
		t.Fatalf("JSON path %q: %v is not a bool", path, jget(t, v, path))
	}
	return b
}

func jlen(t *testing.T, v any, path string) int {
	t.Helper()
	a, ok := jget(t, v, path).([]any)
	if !ok {
		t.Fatalf("JSON path %q: %v is not an array", path, jget(t, v, path))
	}
	return len(a)
}

// jstrings reads a JSON array of strings.
func jstrings(t *testing.T, v any, path string) []string {
	t.Helper()
	var out []string
	for i := range jlen(t, v, path) {
		out = append(out, jstr(t, v, fmt.Sprintf("%s.%d", path, i)))
	}
	return out
}

var (
	loopbackPort = regexp.MustCompile(`127\.0\.0\.1:(\d+)`)
	rfc3339      = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`)
)

// normalize replaces what changes from run to run with fixed-width
// placeholders, so that table alignment is kept: loopback ports become the
// names given to them (others "other"), times "YYYY-MM-DDTHH:MM:SSZ", and the
// given literal strings their replacement padded to the same width.
func (c *doubleCluster) normalize(s string, literal map[string]string) string {
	for from, to := range literal {
		if len(to) < len(from) {
			to += strings.Repeat("_", len(from)-len(to))
		}
		s = strings.ReplaceAll(s, from, to[:len(from)])
	}
	s = loopbackPort.ReplaceAllStringFunc(s, func(m string) string {
		port := m[len("127.0.0.1:"):]
		name, ok := c.labels[port]
		if !ok {
			if len(port) < 5 {
				return m // a fixed port such as 0
			}
			name = "other"
		}
		if len(name) < len(port) {
			name += strings.Repeat("_", len(port)-len(name))
		}
		return "127.0.0.1:" + name[:len(port)]
	})
	return rfc3339.ReplaceAllString(s, "YYYY-MM-DDTHH:MM:SSZ")
}

// golden compares got with testdata/name.golden, rewriting it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if string(want) != got {
		t.Errorf("%s differs from the golden file (run with -update to rewrite it):\n--- got\n%s--- want\n%s", path, got, want)
	}
}

// copysetRefs returns the copysets the MDS records, in order.
func (c *doubleCluster) copysets() []*mdspb.Copyset {
	c.t.Helper()
	resp, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.Copysets
}

func ref(pool, copyset uint32) *commonpb.CopysetRef {
	return &commonpb.CopysetRef{LogicalPoolId: pool, CopysetId: copyset}
}
