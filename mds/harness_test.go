package mds_test

import (
	"context"
	"fmt"
	"regexp"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/mds/mdstest"
)

// Small cluster constants keep test segments cheap: 8 chunks per segment.
var testConstants = &mdspb.ClusterConstants{ChunkSize: 1 << 20, SegmentSize: 8 << 20, BlockSize: 512, MetaPageSize: 4096}

// testConfig is an MDS config with ephemeral ports and short timeouts.
func testConfig(t testing.TB, dir string) mds.Config {
	return mds.Config{
		DataDir:            dir,
		ListenAddr:         "127.0.0.1:0",
		MetricsAddr:        "127.0.0.1:0",
		ElectionTTL:        2 * time.Second,
		HeartbeatInterval:  100 * time.Millisecond,
		UnstableTimeout:    10 * time.Second, // tests of UNSTABLE set a short one
		OfflineTimeout:     30 * time.Second,
		SessionLease:       30 * time.Second, // tests of expiry set a short one
		BackgroundInterval: 100 * time.Millisecond,
		RPCTimeout:         2 * time.Second,
		Constants:          testConstants,
		Logger:             testlog.New(t),
		// Doubles carry out no operator: balance moves would only wait.
		Schedule: mds.ScheduleConfig{NoBalance: true},
	}
}

// startMDS starts an MDS and waits until it leads (when wantLeader).
func startMDS(t *testing.T, cfg mds.Config, wantLeader bool) *mds.Server {
	t.Helper()
	s, err := mds.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	if wantLeader {
		soon.Succeeds(t, 20*time.Second, func() error {
			if !s.Leading() {
				return fmt.Errorf("MDS %s not leading yet", s.Addr())
			}
			return nil
		})
	}
	return s
}

// startMDSB starts a leading MDS for a benchmark and returns its address.
func startMDSB(b *testing.B, cfg mds.Config) string {
	b.Helper()
	s, err := mds.New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.Stop)
	for !s.Leading() {
		time.Sleep(10 * time.Millisecond)
	}
	return s.Addr()
}

func dial(t *testing.T, addrs ...string) *mdsclient.Conn {
	t.Helper()
	c, err := mdsclient.Dial(addrs, mdsclient.Options{Logger: testlog.New(t), RetryBudget: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got error %v, want code %s", err, code)
	}
}

// wantMessage checks err's code and that its whole message matches the
// regular expression re (what an operator reads).
func wantMessage(t *testing.T, err error, code codes.Code, re string) {
	t.Helper()
	wantCode(t, err, code)
	if msg := status.Convert(err).Message(); !regexp.MustCompile("^" + re + "$").MatchString(msg) {
		t.Fatalf("message %q, want one matching %q", msg, re)
	}
}

// cluster is an MDS with chunkserver doubles in several zones.
type cluster struct {
	t    *testing.T
	ctx  context.Context
	cfg  mds.Config
	mds  *mds.Server
	conn *mdsclient.Conn
	css  []*mdstest.ChunkServerDouble
}

// newCluster starts an MDS and zones x perZone chunkserver doubles (two per
// host) in physical pool "pool0", all registered.
func newCluster(t *testing.T, zones, perZone int, tweak func(*mds.Config)) *cluster {
	t.Helper()
	cfg := testConfig(t, t.TempDir())
	if tweak != nil {
		tweak(&cfg)
	}
	c := &cluster{t: t, ctx: context.Background(), cfg: cfg}
	c.mds = startMDS(t, cfg, true)
	c.conn = dial(t, c.mds.Addr())
	for z := 0; z < zones; z++ {
		for i := 0; i < perZone; i++ {
			d := mdstest.StartChunkServerDouble(t, fmt.Sprintf("host-%d-%d", z, i/2), fmt.Sprintf("zone-%d", z), "pool0")
			d.DataDir = fmt.Sprintf("/data/%d", i)
			if err := d.Register(c.ctx, c.conn.Topology(), testConstants); err != nil {
				t.Fatal(err)
			}
			c.css = append(c.css, d)
		}
	}
	return c
}

// createPool creates logical pool "lp0" with perCS copysets per chunkserver,
// makes each copyset's first peer report itself leader, and heartbeats once.
func (c *cluster) createPool(perCS uint32) *mdspb.LogicalPool {
	c.t.Helper()
	resp, err := c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{
		Name: "lp0", PhysicalPool: "pool0", CopysetsPerChunkserver: perCS,
	})
	if err != nil {
		c.t.Fatal(err)
	}
	for _, d := range c.css {
		d.LeadFirstPeers()
	}
	c.heartbeatAll()
	return resp.Pool
}

func (c *cluster) heartbeatAll() {
	c.t.Helper()
	for _, d := range c.css {
		if _, err := d.Heartbeat(c.ctx, c.conn.Heartbeats()); err != nil {
			c.t.Fatalf("heartbeat of chunkserver %d: %v", d.ID(), err)
		}
	}
}

// heartbeatLoop heartbeats every double (but those skip says to leave out)
// every interval until the test ends.
func (c *cluster) heartbeatLoop(skip func(*mdstest.ChunkServerDouble) bool) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	c.t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		t := time.NewTicker(c.cfg.HeartbeatInterval)
		defer t.Stop()
		for {
			for _, d := range c.css {
				if skip == nil || !skip(d) {
					_, _ = d.Heartbeat(ctx, c.conn.Heartbeats())
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

func (c *cluster) createVolume(name string, size uint64) *mdspb.Volume {
	c.t.Helper()
	resp, err := c.conn.Volumes().CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: name, Size: size, Owner: "test"})
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.Volume
}

func (c *cluster) allocate(name string, offset uint64) *mdspb.Segment {
	c.t.Helper()
	resp, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: name, Offset: offset, Allocate: true})
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.Segment
}

func (c *cluster) double(id uint64) *mdstest.ChunkServerDouble {
	for _, d := range c.css {
		if d.ID() == id {
			return d
		}
	}
	c.t.Fatalf("no double with id %d", id)
	return nil
}

// startDouble starts and registers a chunkserver double in zone z.
func startDouble(t *testing.T, c *cluster, z int) *mdstest.ChunkServerDouble {
	t.Helper()
	d := mdstest.StartChunkServerDouble(t, fmt.Sprintf("host-%d-%d", z, len(c.css)), fmt.Sprintf("zone-%d", z), "pool0")
	if err := d.Register(c.ctx, c.conn.Topology(), testConstants); err != nil {
		t.Fatal(err)
	}
	return d
}
