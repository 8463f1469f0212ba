// Package cluster starts a whole Cairn cluster inside a test process: an MDS
// with its embedded etcd and several real chunkservers, each in its own zone
// with its own data directory, talking real gRPC over loopback. Tests of the
// chunkserver, the client library, the gateways and the ops CLI run against
// it.
//
// Chunks are small (1 MiB by default, 64 MiB segments) so that pools and
// snapshots stay small; everything lives under the test's temporary
// directory and is stopped when the test ends.
package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdsclient"
)

// Options shape a test cluster. Zero values take the defaults named.
type Options struct {
	// ChunkServers is the number of chunkservers (default 3), spread over
	// Zones zones round-robin: chunkserver i is in zone i%Zones+1 (default
	// one zone per chunkserver).
	ChunkServers, Zones int
	// ChunkSize (default 1 MiB) and SegmentSize (default 64 MiB).
	ChunkSize, SegmentSize uint64
	// CopysetsPerChunkServer for the logical pool (default 8). With
	// NoPool no logical pool is created.
	CopysetsPerChunkServer uint32
	NoPool                 bool
	// PoolBytes formatted per chunkserver at start (default 16 MiB); pools
	// grow on demand up to PoolMaxBytes (default 512 MiB).
	PoolBytes, PoolMaxBytes int64
	// EpochLease is the MDS's epoch lease (default 5s: long enough that a
	// loaded machine's late heartbeats or a stopped MDS do not pause IO at
	// once; tests of the lease set a short one). A writable open that cannot
	// reach every chunkserver waits about this long.
	EpochLease time.Duration
	// Faults, if set, is shared by every chunkserver's Raft transport.
	Faults *transport.Faults
	// SessionLease is the MDS's volume session lease (default: the MDS's).
	SessionLease time.Duration
	// Tune, if set, adjusts each chunkserver's config before it starts.
	Tune func(i int, c *chunkserver.Config)
	// Schedule configures the MDS's schedulers. The zero value keeps the
	// MDS's defaults (recovery only after 10 minutes) but turns balancing
	// off, so that leaderships stay where a test found them.
	Schedule mds.ScheduleConfig
	// TLS runs the cluster with mutual TLS: a CA in the cluster's
	// directory, a certificate per role (Identity), Conn as an operator.
	TLS bool
}

// Cluster is a running test cluster.
type Cluster struct {
	t    testing.TB
	opts Options
	// mdsAddr is where a stopped MDS listened (StopMDS).
	mdsAddr string
	dir     string
	log     *slog.Logger

	MDS *mds.Server
	// Conn reaches the MDS (leader-following).
	Conn *mdsclient.Conn
	// Pool is the logical pool created at start (nil with NoPool).
	Pool *mdspb.LogicalPool

	mu    sync.Mutex
	cs    []*chunkserver.Server
	addrs []string
	ca    *certs.CA
	ids   map[certs.Role]*certs.Source
}

// Issue writes a certificate for name with roles, valid for loopback, from
// the cluster's CA (TLS clusters only).
func (c *Cluster) Issue(name string, req certs.Request) certs.Files {
	c.t.Helper()
	if c.ca == nil {
		c.t.Fatal("Issue on a cluster without TLS")
	}
	if req.Name == "" {
		req.Name = name
	}
	if req.Hosts == nil {
		req.Hosts = []string{"127.0.0.1", "localhost"}
	}
	f, err := c.ca.Issue(filepath.Join(c.dir, "tls"), name, req)
	if err != nil {
		c.t.Fatal(err)
	}
	return f
}

// Identity returns the identity of role in a TLS cluster (nil without
// TLS): the one the cluster's own processes use.
func (c *Cluster) Identity(role certs.Role) *certs.Source {
	if c.ids == nil {
		return nil
	}
	if id := c.ids[role]; id != nil {
		return id
	}
	id, err := certs.Load(c.Issue(string(role), certs.Request{Roles: []certs.Role{role}}), c.log)
	if err != nil {
		c.t.Fatal(err)
	}
	c.ids[role] = id
	return id
}

// Logger returns the logger tests use: quiet unless CAIRN_TEST_LOG is set
// (to "debug" or "warn").
func Logger() *slog.Logger {
	if l := testlog.FromEnv(); l != nil {
		return l
	}
	return slog.New(slog.DiscardHandler)
}

// Start starts a cluster and stops it when the test ends.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.ChunkServers == 0 {
		opts.ChunkServers = 3
	}
	if opts.Zones == 0 {
		opts.Zones = opts.ChunkServers
	}
	if opts.ChunkSize == 0 {
		opts.ChunkSize = 1 << 20
	}
	if opts.SegmentSize == 0 {
		opts.SegmentSize = 64 * opts.ChunkSize
	}
	if opts.CopysetsPerChunkServer == 0 {
		opts.CopysetsPerChunkServer = 8
	}
	if opts.PoolBytes == 0 {
		opts.PoolBytes = 16 << 20
	}
	if opts.PoolMaxBytes == 0 {
		opts.PoolMaxBytes = 512 << 20
	}
	if opts.EpochLease == 0 {
		opts.EpochLease = 5 * time.Second
	}
	if opts.Schedule == (mds.ScheduleConfig{}) {
		opts.Schedule.NoBalance = true
	}
	c := &Cluster{t: t, opts: opts, dir: t.TempDir(), log: testlog.New(t)}
	t.Cleanup(c.Stop)
	if opts.TLS {
		ca, err := certs.OpenCA(filepath.Join(c.dir, "tls"), "test CA")
		if err != nil {
			t.Fatal(err)
		}
		c.ca, c.ids = ca, map[certs.Role]*certs.Source{}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := c.startMDS("127.0.0.1:0")
	c.MDS = m
	var err error
	c.Conn, err = mdsclient.Dial([]string{m.Addr()}, mdsclient.Options{Logger: c.log, TLS: c.Identity(certs.RoleOperator)})
	if err != nil {
		t.Fatalf("dial MDS: %v", err)
	}
	c.cs = make([]*chunkserver.Server, opts.ChunkServers)
	c.addrs = make([]string, opts.ChunkServers)
	for i := range c.cs {
		c.StartChunkServer(i)
	}
	if !opts.NoPool {
		// Placement uses the chunkservers the MDS sees online: wait for
		// every one's heartbeat, which a loaded machine may delay.
		soon.Succeeds(t, time.Minute, func() error {
			online, err := c.Conn.OnlineChunkServers(ctx)
			if err != nil {
				return err
			}
			if len(online) < opts.ChunkServers {
				return fmt.Errorf("%d of %d chunkservers online", len(online), opts.ChunkServers)
			}
			return nil
		})
		resp, err := c.Conn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{
			Name: "pool", PhysicalPool: "pool1", CopysetsPerChunkserver: opts.CopysetsPerChunkServer,
		})
		if err != nil {
			t.Fatalf("create logical pool: %v", err)
		}
		c.Pool = resp.GetPool()
		c.WaitHealthy()
	}
	return c
}

// Dir is the cluster's root directory.
func (c *Cluster) Dir() string { return c.dir }

// ChunkServerDir is the data directory of chunkserver i.
func (c *Cluster) ChunkServerDir(i int) string { return filepath.Join(c.dir, fmt.Sprintf("cs%d", i)) }

// ChunkServerConfig is the configuration chunkserver i starts with.
func (c *Cluster) ChunkServerConfig(i int) chunkserver.Config {
	c.mu.Lock()
	listen := c.addrs[i]
	c.mu.Unlock()
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	cfg := chunkserver.Config{
		DataDir:           c.ChunkServerDir(i),
		ListenAddr:        listen,
		MetricsAddr:       "-",
		MDSAddrs:          []string{c.MDS.Addr()},
		Zone:              fmt.Sprintf("zone%d", i%c.opts.Zones+1),
		Hostname:          fmt.Sprintf("host%d", i+1),
		PhysicalPool:      "pool1",
		PoolInitialBytes:  c.opts.PoolBytes,
		PoolMaxBytes:      c.opts.PoolMaxBytes,
		PoolReserveBytes:  64 << 20,
		TickInterval:      50 * time.Millisecond,
		HeartbeatInterval: 200 * time.Millisecond,
		TestingKnobs:      chunkserver.TestingKnobs{Faults: c.opts.Faults},
		TLS:               c.Identity(certs.RoleChunkServer),
		Logger:            c.log.With("cluster_index", i),
	}
	if c.opts.Tune != nil {
		c.opts.Tune(i, &cfg)
	}
	return cfg
}

// StartChunkServer starts (or restarts, from its data directory and on its
// previous address) chunkserver i.
func (c *Cluster) StartChunkServer(i int) *chunkserver.Server {
	c.t.Helper()
	cfg := c.ChunkServerConfig(i)
	var s *chunkserver.Server
	var err error
	// A restarted chunkserver takes back its port; it may linger briefly.
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err = chunkserver.New(cfg)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			err = s.Start(ctx)
			cancel()
		}
		if err == nil || time.Now().After(deadline) {
			break
		}
		if _, ok := err.(*net.OpError); !ok && !isAddrInUse(err) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatalf("start chunkserver %d: %v", i, err)
	}
	c.mu.Lock()
	c.cs[i] = s
	c.addrs[i] = s.Addr()
	c.mu.Unlock()
	return s
}

// AddChunkServer starts a new chunkserver in the given zone (1-based) and
// returns its index.
func (c *Cluster) AddChunkServer(zone int) int {
	c.t.Helper()
	c.mu.Lock()
	i := len(c.cs)
	c.cs = append(c.cs, nil)
	c.addrs = append(c.addrs, "")
	c.mu.Unlock()
	prev := c.opts.Tune
	c.opts.Tune = func(j int, cfg *chunkserver.Config) {
		if prev != nil {
			prev(j, cfg)
		}
		if j == i {
			cfg.Zone = fmt.Sprintf("zone%d", zone)
		}
	}
	c.StartChunkServer(i)
	return i
}

func isAddrInUse(err error) bool {
	return err != nil && strings.Contains(err.Error(), "address already in use")
}

// StopChunkServer stops chunkserver i cleanly.
func (c *Cluster) StopChunkServer(i int) {
	c.mu.Lock()
	s := c.cs[i]
	c.cs[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Stop()
	}
}

// ChunkServer returns chunkserver i (nil while stopped).
func (c *Cluster) ChunkServer(i int) *chunkserver.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cs[i]
}

// ChunkServers returns the running chunkservers.
func (c *Cluster) ChunkServers() []*chunkserver.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*chunkserver.Server
	for _, s := range c.cs {
		if s != nil {
			out = append(out, s)
		}
	}
	return out
}

// ByID returns the running chunkserver with the given id.
func (c *Cluster) ByID(id uint64) *chunkserver.Server {
	for _, s := range c.ChunkServers() {
		if s.ID() == id {
			return s
		}
	}
	return nil
}

// WaitHealthy waits until every copyset of the pool has a leader that the
// MDS knows about.
func (c *Cluster) WaitHealthy() {
	c.t.Helper()
	soon.Succeeds(c.t, time.Minute, func() error {
		resp, err := c.Conn.Topology().ListCopysets(context.Background(), &mdspb.ListCopysetsRequest{})
		if err != nil {
			return err
		}
		if len(resp.GetCopysets()) == 0 {
			return fmt.Errorf("no copysets")
		}
		for _, cs := range resp.GetCopysets() {
			if cs.GetLeaderId() == 0 {
				return fmt.Errorf("copyset %s has no leader reported", cs.GetId().Name())
			}
		}
		return nil
	})
}

// Stop stops every chunkserver and the MDS.
func (c *Cluster) Stop() {
	for i := range c.cs {
		c.StopChunkServer(i)
	}
	if c.Conn != nil {
		c.Conn.Close()
		c.Conn = nil
	}
	if c.MDS != nil {
		c.MDS.Stop()
		c.MDS = nil
	}
}

// ChunkClient sends chunk requests to copyset leaders the simple way: ask
// the MDS who leads, follow REDIRECTED hints, retry while the copyset has no
// leader. It is a test tool, not the client library.
type ChunkClient struct {
	t     testing.TB
	mds   *mdsclient.Conn
	tls   *certs.Source // nil: plaintext
	mu    sync.Mutex
	conns map[string]chunkpb.ChunkServiceClient
}

// startMDS starts the cluster's MDS on addr, over its data directory.
func (c *Cluster) startMDS(addr string) *mds.Server {
	c.t.Helper()
	opts := c.opts
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m, err := mds.New(mds.Config{
		DataDir:           filepath.Join(c.dir, "mds"),
		ListenAddr:        addr,
		MetricsAddr:       "-",
		Constants:         &mdspb.ClusterConstants{ChunkSize: opts.ChunkSize, SegmentSize: opts.SegmentSize, BlockSize: 512, MetaPageSize: 4096},
		HeartbeatInterval: 200 * time.Millisecond,
		EpochLease:        opts.EpochLease,
		SessionLease:      opts.SessionLease,
		ElectionTTL:       2 * time.Second,
		Schedule:          opts.Schedule,
		TLS:               c.Identity(certs.RoleMDS),
		Logger:            c.log,
	})
	if err != nil {
		c.t.Fatalf("new MDS: %v", err)
	}
	if err := m.Start(ctx); err != nil {
		c.t.Fatalf("start MDS: %v", err)
	}
	return m
}

// RestartMDS stops the MDS and starts it again on the same address and
// data: a failover to a new leader that finds the state in etcd.
func (c *Cluster) RestartMDS() {
	c.t.Helper()
	c.StopMDS()
	c.StartMDS()
}

// StopMDS stops the MDS (StartMDS starts it again where it was).
func (c *Cluster) StopMDS() {
	c.mdsAddr = c.MDS.Addr()
	c.MDS.Stop()
}

// StartMDS starts the MDS stopped by StopMDS on its address and data.
func (c *Cluster) StartMDS() {
	c.t.Helper()
	c.MDS = c.startMDS(c.mdsAddr)
}

// ChunkClient returns a chunk client for the cluster.
func (c *Cluster) ChunkClient() *ChunkClient {
	cc := NewChunkClient(c.t, c.Conn)
	cc.tls = c.Identity(certs.RoleOperator)
	return cc
}

// NewChunkClient returns a chunk client that finds leaders through mds.
func NewChunkClient(t testing.TB, mds *mdsclient.Conn) *ChunkClient {
	return &ChunkClient{t: t, mds: mds, conns: map[string]chunkpb.ChunkServiceClient{}}
}

// Client returns a ChunkService client for a chunkserver address.
func (cc *ChunkClient) Client(addr string) chunkpb.ChunkServiceClient {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cl, ok := cc.conns[addr]; ok {
		return cl
	}
	conn, err := dial(addr, cc.tls)
	if err != nil {
		cc.t.Fatalf("dial %s: %v", addr, err)
	}
	cl := chunkpb.NewChunkServiceClient(conn)
	cc.conns[addr] = cl
	return cl
}

// Leader asks the MDS for a copyset's members and returns the address of
// the member that reports leading it.
func (cc *ChunkClient) Leader(ctx context.Context, ref *commonpb.CopysetRef) (string, error) {
	resp, err := cc.mds.Topology().GetCopysets(ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{ref}})
	if err != nil {
		return "", err
	}
	if len(resp.GetCopysets()) != 1 {
		return "", fmt.Errorf("copyset %s unknown to the MDS", ref.Name())
	}
	cs := resp.GetCopysets()[0]
	for _, p := range cs.GetPeers() {
		if p.GetChunkserverId() == cs.GetLeaderId() {
			return p.GetAddress(), nil
		}
	}
	if len(cs.GetPeers()) > 0 {
		return cs.GetPeers()[0].GetAddress(), nil
	}
	return "", fmt.Errorf("copyset %s has no members", ref.Name())
}

// Do runs f against the copyset's leader until it returns a status other
// than REDIRECTED or UNAVAILABLE, following hints; it returns the last
// status.
func (cc *ChunkClient) Do(ctx context.Context, ref *commonpb.CopysetRef, f func(chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error)) (chunkpb.Status, error) {
	addr, err := cc.Leader(ctx, ref)
	if err != nil {
		return 0, err
	}
	for {
		st, hint, err := f(cc.Client(addr))
		switch {
		case err == nil && st != chunkpb.Status_STATUS_REDIRECTED && st != chunkpb.Status_STATUS_UNAVAILABLE:
			return st, nil
		case err == nil && st == chunkpb.Status_STATUS_REDIRECTED && hint.GetAddress() != "":
			addr = hint.GetAddress()
			continue
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("last status %v", st)
			}
			return st, fmt.Errorf("%w (%v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
		if a, lerr := cc.Leader(ctx, ref); lerr == nil {
			addr = a
		}
	}
}

// Write writes through the leader.
func (cc *ChunkClient) Write(ctx context.Context, ref *commonpb.CopysetRef, chunk, volume, epoch, off uint64, data []byte) (chunkpb.Status, error) {
	return cc.Do(ctx, ref, func(cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error) {
		r, err := cl.WriteChunk(ctx, &chunkpb.WriteChunkRequest{Copyset: ref, ChunkId: chunk, VolumeId: volume, Epoch: epoch, Offset: off, Data: data})
		return r.GetStatus(), r.GetLeader(), err
	})
}

// Read reads through the leader; a missing chunk reads as zeros.
func (cc *ChunkClient) Read(ctx context.Context, ref *commonpb.CopysetRef, chunk, volume, off, length uint64) ([]byte, chunkpb.Status, error) {
	var data []byte
	st, err := cc.Do(ctx, ref, func(cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error) {
		r, err := cl.ReadChunk(ctx, &chunkpb.ReadChunkRequest{Copyset: ref, ChunkId: chunk, VolumeId: volume, Offset: off, Length: length})
		data = r.GetData()
		return r.GetStatus(), r.GetLeader(), err
	})
	if st == chunkpb.Status_STATUS_CHUNK_NOTEXIST {
		data = make([]byte, length)
	}
	return data, st, err
}
