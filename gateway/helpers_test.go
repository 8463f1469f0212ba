package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/test/cluster"
)

// fileVolumeDouble stands in for the client library's volume in the tests
// of the gateway's own logic (sharing, lingering, fencing, deletion): a real
// file, fsynced on Flush, with holes punched on Unmap. It counts the calls
// the gateway makes. Tests over real client volumes are in
// gateway_cluster_test.go.
type fileVolumeDouble struct {
	name string
	f    *os.File
	size int64
	set  *volumeDoubles

	mu      sync.Mutex
	fenced  bool
	closed  bool
	flushes int
}

func (v *fileVolumeDouble) check() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return errors.New("volume double: used after Close")
	}
	if v.fenced {
		return fmt.Errorf("volume double %s: %w", v.name, ErrFenced)
	}
	return nil
}

func (v *fileVolumeDouble) ReadAt(p []byte, off int64) (int, error) {
	if err := v.check(); err != nil {
		return 0, err
	}
	return v.f.ReadAt(p, off)
}

func (v *fileVolumeDouble) WriteAt(p []byte, off int64) (int, error) {
	if err := v.check(); err != nil {
		return 0, err
	}
	return v.f.WriteAt(p, off)
}

func (v *fileVolumeDouble) UnmapAt(off, length int64) error {
	if err := v.check(); err != nil {
		return err
	}
	return unix.Fallocate(int(v.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (v *fileVolumeDouble) Flush() error {
	if err := v.check(); err != nil {
		return err
	}
	v.mu.Lock()
	v.flushes++
	v.mu.Unlock()
	return v.f.Sync()
}

func (v *fileVolumeDouble) Size() int64 { return v.size }

func (v *fileVolumeDouble) Close() error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return errors.New("volume double: closed twice")
	}
	v.closed = true
	v.mu.Unlock()
	v.set.mu.Lock()
	v.set.closes[v.name]++
	v.set.mu.Unlock()
	return v.f.Close()
}

// volumeDoubles opens fileVolumeDoubles for the volumes the MDS knows; the
// files persist across opens, as a volume's data does.
type volumeDoubles struct {
	t   *testing.T
	dir string
	c   *cluster.Cluster

	mu     sync.Mutex
	opens  map[string]int
	closes map[string]int
	open   map[string]*fileVolumeDouble // latest open per name
}

func newVolumeDoubles(t *testing.T, c *cluster.Cluster) *volumeDoubles {
	return &volumeDoubles{t: t, dir: t.TempDir(), c: c, opens: map[string]int{}, closes: map[string]int{},
		open: map[string]*fileVolumeDouble{}}
}

// Open is the gateway's Config.OpenVolume: like the client, it asks the MDS
// whether the volume exists and how large it is.
func (d *volumeDoubles) Open(ctx context.Context, name string) (Volume, error) {
	st, err := d.c.Conn.Volumes().StatVolume(ctx, &mdspb.StatVolumeRequest{Name: name})
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return nil, fmt.Errorf("%w: %s: %w", ErrUnknownVolume, name, err)
		}
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(d.dir, name), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	size := int64(st.GetVolume().GetSize())
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	v := &fileVolumeDouble{name: name, f: f, size: size, set: d}
	d.mu.Lock()
	d.opens[name]++
	d.open[name] = v
	d.mu.Unlock()
	return v, nil
}

func (d *volumeDoubles) counts(name string) (opens, closes int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.opens[name], d.closes[name]
}

func (d *volumeDoubles) latest(name string) *fileVolumeDouble {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.open[name]
}

// startCluster starts a small in-process cluster (real MDS, etcd and
// chunkservers) and creates the named volumes of 64 MiB.
func startCluster(t *testing.T, volumes ...string) *cluster.Cluster {
	t.Helper()
	c := cluster.Start(t, cluster.Options{CopysetsPerChunkServer: 4})
	for _, v := range volumes {
		createVolume(t, c, v, 64<<20)
	}
	return c
}

func createVolume(t *testing.T, c *cluster.Cluster, name string, size uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: name, Size: size}); err != nil {
		t.Fatalf("create volume %s: %v", name, err)
	}
}

// startGateway starts a gateway on ephemeral ports; it stops when the test
// ends.
func startGateway(t *testing.T, c *cluster.Cluster, mutate func(*Config)) *Gateway {
	t.Helper()
	cfg := Config{
		MDSAddrs:     []string{c.MDS.Addr()},
		NBDAddr:      "127.0.0.1:0",
		ISCSIAddr:    "127.0.0.1:0",
		MetricsAddr:  "127.0.0.1:0",
		PollInterval: 200 * time.Millisecond,
		Linger:       300 * time.Millisecond,
		Logger:       cluster.Logger().With("component", "gateway"),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	g, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Stop(); err != nil {
			t.Errorf("stop gateway: %v", err)
		}
	})
	return g
}

func needTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed (Debian packages libnbd-bin, libiscsi-bin, qemu-utils, qemu-block-extra)", name)
	}
}

// runTool runs a command in a temporary directory with a deadline and
// returns its combined output.
func runTool(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir()
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s timed out after %s: %w", name, timeout, ctx.Err())
	}
	return string(out), err
}

func mustRun(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runTool(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func writeRandomFile(t *testing.T, path string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

func compareFiles(t *testing.T, want []byte, path string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < len(want) {
		t.Fatalf("%s: %d bytes, want at least %d", path, len(got), len(want))
	}
	if i := firstDiff(got[:len(want)], want); i >= 0 {
		t.Fatalf("%s differs from what was written at byte %d", path, i)
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// succeedsSoon retries f until it returns nil or d passes.
func succeedsSoon(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	cluster.SucceedsSoon(t, d, f)
}

func httpGet(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}
