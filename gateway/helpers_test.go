package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/test/cluster"
)

// volumeDoubles stands in for the client library in the tests of the
// gateway's own logic (sharing, lingering, fencing, deletion): it opens the
// shared test double's file devices (a real file per volume, fsynced on
// Flush, holes punched on unmap), one per volume the MDS knows, created on
// the first open and kept across opens as a volume's data is, and counts
// opens and closes. Tests over real client volumes are in
// gateway_cluster_test.go.
type volumeDoubles struct {
	*blockdevtest.Catalog
	t   *testing.T
	dir string
	c   *cluster.Cluster
	mu  sync.Mutex
}

func newVolumeDoubles(t *testing.T, c *cluster.Cluster) *volumeDoubles {
	d := &volumeDoubles{Catalog: blockdevtest.NewCatalog(), t: t, dir: t.TempDir(), c: c}
	// Registered before the gateway starts, so it runs after the gateway
	// stopped (and flushed and closed its volumes).
	t.Cleanup(func() {
		names, _ := d.List(context.Background())
		for _, n := range names {
			d.Device(n).Close()
		}
	})
	return d
}

// Open is the gateway's Config.OpenVolume: like the client, it asks the MDS
// whether the volume exists and how large it is.
func (d *volumeDoubles) Open(ctx context.Context, name string) (blockdev.Device, error) {
	st, err := d.c.Conn.Volumes().StatVolume(ctx, &mdspb.StatVolumeRequest{Name: name})
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return nil, fmt.Errorf("%w: %s: %w", blockdev.ErrNotFound, name, err)
		}
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.Device(name) == nil {
		path := filepath.Join(d.dir, name)
		if err := os.WriteFile(path, nil, 0o644); err != nil {
			return nil, err
		}
		if err := os.Truncate(path, int64(st.GetVolume().GetSize())); err != nil {
			return nil, err
		}
		dev, err := blockdevtest.NewFile(path)
		if err != nil {
			return nil, err
		}
		d.Add(name, dev)
	}
	// A fresh open takes a new epoch: whatever fenced the previous one
	// does not fence it.
	d.Device(name).SetHook(nil)
	return d.Catalog.Open(ctx, name)
}

// counts returns how often name was opened and closed.
func (d *volumeDoubles) counts(name string) (opens, closes int) {
	o := d.Opens(name)
	return o, o - d.Live(name)
}

// fence makes every later call of name's device fail as a fenced volume's,
// until the volume is opened again.
func (d *volumeDoubles) fence(name string) {
	d.Device(name).SetHook(func(context.Context, *blockdevtest.Call) error {
		return fmt.Errorf("volume double %s: %w", name, ErrFenced)
	})
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
		Logger:       cluster.Logger(),
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

func httpGet(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}
