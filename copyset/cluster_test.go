package copyset

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/internal/geometry"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/internal/wire"
	"cairn.io/cairn/test/faultfs"
)

// Test geometry: small chunks keep the pools and snapshots small.
const (
	testChunkSize = 256 << 10
	testBlock     = 4096
)

// testNode is one in-process chunkserver: a real chunk file pool, real chunk
// stores, the engine and a gRPC server on loopback.
type testNode struct {
	id     uint64
	dir    string
	pool   *chunkfilepool.Pool
	files  *datastore.FileCache
	engine *Engine
	srv    *grpc.Server
	wsrv   *wire.Server
}

// crashSeed makes the pages a partial crash keeps repeatable.
var crashSeed atomic.Uint64

// testCluster runs several chunkservers in one process with a shared
// resolver and fault injector.
type testCluster struct {
	t      testing.TB
	dir    string
	faults *transport.Faults
	// network, when set, carries Raft traffic in memory (newMemoryCluster)
	// instead of over loopback sockets.
	network *transport.Network
	tune    func(*Config)
	poolN   int
	log     *slog.Logger

	// disks holds each node's faultfs when the cluster was made with
	// newCrashableCluster: its data directory is on the mount, so that a
	// crash loses exactly what was not fsynced.
	disks map[uint64]*faultfs.FS

	mu    sync.Mutex
	addrs map[uint64]string
	nodes map[uint64]*testNode
}

func (tc *testCluster) Resolve(_ context.Context, id uint64) (string, error) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if a, ok := tc.addrs[id]; ok {
		return a, nil
	}
	return "", fmt.Errorf("chunkserver %d not running", id)
}

// newTestCluster starts nodes 1..n. poolChunks sizes each node's pool.
func newTestCluster(t testing.TB, n, poolChunks int, tune func(*Config)) *testCluster {
	t.Helper()
	tc := &testCluster{
		t: t, dir: t.TempDir(), faults: transport.NewFaults(1), tune: tune, poolN: poolChunks,
		addrs: map[uint64]string{}, nodes: map[uint64]*testNode{}, log: testlog.New(t),
	}
	for id := uint64(1); id <= uint64(n); id++ {
		tc.start(id)
	}
	t.Cleanup(tc.close)
	tc.waitFormatted()
	return tc
}

// newMemoryCluster is newTestCluster with Raft traffic carried in memory:
// no sockets, no connection goroutines; with manual ticks (see
// manualCluster) what happens depends only on what the test does.
func newMemoryCluster(t testing.TB, n, poolChunks int, tune func(*Config)) *testCluster {
	t.Helper()
	tc := &testCluster{
		t: t, dir: t.TempDir(), faults: transport.NewFaults(1), network: transport.NewNetwork(), tune: tune,
		poolN: poolChunks, addrs: map[uint64]string{}, nodes: map[uint64]*testNode{}, log: testlog.New(t),
	}
	for id := uint64(1); id <= uint64(n); id++ {
		tc.start(id)
	}
	t.Cleanup(tc.close)
	tc.waitFormatted()
	return tc
}

// newCrashableCluster is newTestCluster with every node's data directory on
// its own faultfs, so that crash (stop with crash) cuts the power: every
// byte not fsynced is lost, and nothing else.
func newCrashableCluster(t *testing.T, n, poolChunks int, tune func(*Config)) *testCluster {
	t.Helper()
	tc := &testCluster{
		t: t, faults: transport.NewFaults(1), tune: tune, poolN: poolChunks,
		addrs: map[uint64]string{}, nodes: map[uint64]*testNode{}, log: testlog.New(t),
		disks: map[uint64]*faultfs.FS{},
	}
	for id := uint64(1); id <= uint64(n); id++ {
		tc.disks[id] = faultfs.MountForTest(t, faultfs.Options{Logger: tc.log})
	}
	t.Cleanup(tc.close) // registered after the mounts: runs before they are unmounted
	for id := uint64(1); id <= uint64(n); id++ {
		tc.start(id)
	}
	tc.waitFormatted()
	return tc
}

// waitFormatted waits until every node's chunk file pool formatted its
// initial files, so that a test's load does not start against pools that
// cannot give out chunk files yet (writes would wait for them).
func (tc *testCluster) waitFormatted() {
	tc.t.Helper()
	soon.Succeeds(tc.t, 2*time.Minute, func() error {
		for _, n := range tc.running() {
			if st := n.pool.Stats(); st.FormatPercent < 100 {
				return fmt.Errorf("node %d's pool is %d%% formatted", n.id, st.FormatPercent)
			}
		}
		return nil
	})
}

// nodeDir is node id's data directory.
func (tc *testCluster) nodeDir(id uint64) string {
	if d := tc.disks[id]; d != nil {
		return d.Path(fmt.Sprintf("cs%d", id))
	}
	return filepath.Join(tc.dir, fmt.Sprintf("cs%d", id))
}

func (tc *testCluster) start(id uint64) *testNode {
	tc.t.Helper()
	dir := tc.nodeDir(id)
	pool, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir: filepath.Join(dir, "chunkfilepool"), ChunkSize: testChunkSize, MetaPageSize: 4096, BlockSize: 512,
		InitialChunks: tc.poolN, MaxChunks: 4 * tc.poolN, LowWater: 8,
	})
	if err != nil {
		tc.t.Fatalf("open pool of node %d: %v", id, err)
	}
	files := datastore.NewFileCache(256)
	cfg := Config{
		NodeID:   id,
		Dir:      filepath.Join(dir, "engine"),
		Segments: pool,
		OpenStore: func(d string) (ChunkStore, error) {
			return datastore.Open(d, pool, datastore.Options{Files: files})
		},
		ChunkSize:       testChunkSize,
		CopyUnit:        geometry.CopyUnit(testChunkSize, 4096, 512),
		Resolver:        tc,
		TestingKnobs:    TestingKnobs{Faults: tc.faults, Network: tc.network},
		TickInterval:    20 * time.Millisecond,
		ElectionTicks:   10,
		CheckpointBytes: 256 << 10,
		RetainBytes:     256 << 10,
		Logger:          tc.log,
	}
	if tc.tune != nil {
		tc.tune(&cfg)
	}
	e, err := NewEngine(cfg)
	if err != nil {
		tc.t.Fatalf("start engine of node %d: %v", id, err)
	}
	n := &testNode{id: id, dir: dir, pool: pool, files: files, engine: e}
	addr := "memory"
	if tc.network != nil {
		e.Register(nil, nil)
	} else {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tc.t.Fatal(err)
		}
		n.srv, n.wsrv = grpc.NewServer(), wire.NewServer(wire.ServerOptions{})
		e.Register(n.srv, n.wsrv)
		wire.ServeSplit(lis, n.wsrv, n.srv)
		addr = lis.Addr().String()
	}
	tc.mu.Lock()
	tc.nodes[id] = n
	tc.addrs[id] = addr
	tc.mu.Unlock()
	return n
}

// stop shuts a node down, cleanly or, on a crashable cluster, as a power
// cut: the node's disk loses everything not fsynced (with 0 < keep < 1,
// each unsynced page survives with probability keep: a partial writeback),
// and only then does the node stop, seeing every write and sync fail.
func (tc *testCluster) stop(id uint64, crash bool, keep float64) {
	if crash {
		tc.cut(id, keep)
	}
	tc.halt(id, crash)
}

// cut cuts the power of node id's disk.
func (tc *testCluster) cut(id uint64, keep float64) {
	tc.t.Helper()
	disk := tc.disks[id]
	if disk == nil {
		tc.t.Fatalf("crash of node %d: the cluster has no faultfs (use newCrashableCluster)", id)
	}
	if _, err := disk.Crash(faultfs.CrashOptions{Keep: keep, Seed: crashSeed.Add(1)}); err != nil {
		tc.t.Fatalf("cut the power of node %d: %v", id, err)
	}
}

// halt stops node id; after a cut, its disk is powered back on afterwards.
func (tc *testCluster) halt(id uint64, crashed bool) {
	tc.mu.Lock()
	n := tc.nodes[id]
	delete(tc.nodes, id)
	delete(tc.addrs, id)
	tc.mu.Unlock()
	if n == nil {
		return
	}
	if n.srv != nil {
		n.srv.Stop()
		_ = n.wsrv.Close()
	}
	if crashed {
		_ = n.engine.Close() // every write and sync fails now: nothing more reaches the disk
		_ = n.pool.Close()
		tc.disks[id].Restart()
		return
	}
	if err := n.engine.Close(); err != nil {
		tc.t.Errorf("close engine of node %d: %v", id, err)
	}
	n.pool.Close()
}

// crashAll cuts the power of every running node at once, then stops them.
func (tc *testCluster) crashAll(keep float64) {
	tc.t.Helper()
	nodes := tc.running()
	for _, n := range nodes {
		tc.cut(n.id, keep)
	}
	for _, n := range nodes {
		tc.halt(n.id, true)
	}
}

func (tc *testCluster) node(id uint64) *testNode {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.nodes[id]
}

func (tc *testCluster) running() []*testNode {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	var out []*testNode
	for _, n := range tc.nodes {
		out = append(out, n)
	}
	return out
}

func (tc *testCluster) close() {
	for _, n := range tc.running() {
		tc.stop(n.id, false, 0)
	}
}

// create creates copysets on each of their members.
func (tc *testCluster) create(ids []GroupID, members []uint64) {
	tc.t.Helper()
	for _, m := range members {
		n := tc.node(m)
		for _, id := range ids {
			if err := n.engine.Create(id, members); err != nil {
				tc.t.Fatalf("create %s on %d: %v", id, m, err)
			}
		}
	}
}

// leader waits until some running node leads the copyset.
func (tc *testCluster) leader(id GroupID) *Copyset {
	tc.t.Helper()
	var c *Copyset
	soon.Succeeds(tc.t, 20*time.Second, func() error {
		for _, n := range tc.running() {
			if cs, err := n.engine.Get(id); err == nil && cs.IsLeader() {
				c = cs
				return nil
			}
		}
		return fmt.Errorf("no leader for %s", id)
	})
	return c
}

// writeRetry writes through whichever node leads, retrying through leader
// changes, as a client would.
func (tc *testCluster) writeRetry(id GroupID, chunk uint64, off int64, data []byte) uint64 {
	tc.t.Helper()
	var idx uint64
	soon.Succeeds(tc.t, 30*time.Second, func() error {
		c := tc.leader(id)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		var err error
		idx, err = writeWait(ctx, c, chunk, 1, 1, off, data)
		return err
	})
	return idx
}

func (tc *testCluster) readRetry(id GroupID, chunk uint64, off int64, n int) []byte {
	tc.t.Helper()
	buf := make([]byte, n)
	soon.Succeeds(tc.t, 30*time.Second, func() error {
		c := tc.leader(id)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		err := c.Read(ctx, chunk, off, buf)
		if err != nil && isNotExist(err) {
			clear(buf)
			return nil
		}
		return err
	})
	return buf
}

func isNotExist(err error) bool {
	return err != nil && (errorsIs(err, datastore.ErrChunkNotExist))
}
