package ops

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds/mdsclient"
)

// replicaDouble is a TEST DOUBLE standing in for a chunkserver in the tests
// of check copyset and check consistency that need a replica in a state a
// real chunkserver cannot be held in on demand: an applied index that stays
// behind, a snapshot install that never ends, chunk files written on some
// replicas only. (TestLiveCluster runs the same commands against real
// chunkservers.) It is NOT a chunkserver: it runs no Raft and serves no
// client IO. It registers with the MDS and heartbeats like one, creates the
// copysets the MDS asks for as real chunk stores (chunkserver/datastore over
// a chunkfilepool, so chunk files are real files on disk), and answers
// CopysetService.GetCopysetStatus, ChunkService.GetChunkInfo and
// ChunkService.GetChunkHash from them with the contract's semantics (any
// replica answers, with its own applied index; a missing chunk hashes as
// zeros). Tests stand in for replication: writeAll applies a write to every
// replica of a copyset and advances each one's applied index.
type replicaDouble struct {
	t          *testing.T
	host, zone string
	dir        string
	addr       string
	pool       *chunkfilepool.Pool
	srv        *grpc.Server

	mu struct {
		sync.Mutex
		id       uint64
		token    string
		copysets map[uint64]*doubleCopyset
		stopped  bool
	}
}

// doubleCopyset is one copyset replica of a replicaDouble.
type doubleCopyset struct {
	ref        *commonpb.CopysetRef
	peers      []*commonpb.Peer
	store      *datastore.Store
	applied    uint64
	installing bool
}

// startReplicaDouble starts a double on 127.0.0.1:0 with its data under
// dir and registers it with the MDS.
func startReplicaDouble(t *testing.T, conn *mdsclient.Conn, host, zone string) *replicaDouble {
	t.Helper()
	d := &replicaDouble{t: t, host: host, zone: zone, dir: t.TempDir()}
	d.mu.copysets = map[uint64]*doubleCopyset{}
	pool, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir: filepath.Join(d.dir, "pool"), ChunkSize: int64(testConstants.ChunkSize),
		MetaPageSize: int64(testConstants.MetaPageSize), BlockSize: int64(testConstants.BlockSize),
		InitialChunks: 24, MaxChunks: 48, LowWater: 4, GetTimeout: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	d.pool = pool
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.addr = lis.Addr().String()
	d.srv = grpc.NewServer()
	copysetpb.RegisterCopysetServiceServer(d.srv, doubleCopysetService{d: d})
	chunkpb.RegisterChunkServiceServer(d.srv, doubleChunkService{d: d})
	go func() { _ = d.srv.Serve(lis) }()
	t.Cleanup(d.close)

	resp, err := conn.Topology().RegisterChunkServer(context.Background(), &mdspb.RegisterChunkServerRequest{
		Hostname: host, DataDir: d.dir, Zone: zone, PhysicalPool: "pool0", Address: d.addr,
		Constants: testConstants, Capacity: d.capacity(),
	})
	if err != nil {
		t.Fatal(err)
	}
	d.mu.id, d.mu.token = resp.ChunkserverId, resp.Token
	return d
}

func (d *replicaDouble) id() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.id
}

func (d *replicaDouble) capacity() *mdspb.Capacity {
	st := d.pool.Stats()
	return &mdspb.Capacity{
		DiskTotalBytes: 10 << 30, DiskFreeBytes: 5 << 30,
		PoolFreeChunks: uint64(st.Clean), PoolUsedChunks: uint64(st.InUse),
		PoolTargetChunks: uint64(st.Target), FormatPercent: uint32(st.FormatPercent),
	}
}

// stop makes the double unreachable (its gRPC server stops) and silent.
func (d *replicaDouble) stop() {
	d.mu.Lock()
	d.mu.stopped = true
	d.mu.Unlock()
	d.srv.Stop()
}

func (d *replicaDouble) close() {
	d.stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.mu.copysets {
		_ = c.store.Close()
	}
	_ = d.pool.Close()
}

// heartbeat sends one heartbeat reporting every copyset; the member with the
// lowest id reports itself leader.
func (d *replicaDouble) heartbeat(ctx context.Context, hb mdspb.HeartbeatServiceClient) error {
	d.mu.Lock()
	if d.mu.stopped {
		d.mu.Unlock()
		return nil
	}
	req := &mdspb.HeartbeatRequest{ChunkserverId: d.mu.id, Token: d.mu.token, Address: d.addr, Capacity: d.capacity()}
	for _, c := range d.sortedLocked() {
		req.Copysets = append(req.Copysets, &mdspb.CopysetReport{Status: d.statusLocked(c)})
	}
	d.mu.Unlock()
	_, err := hb.Heartbeat(ctx, req)
	return err
}

func (d *replicaDouble) sortedLocked() []*doubleCopyset {
	out := make([]*doubleCopyset, 0, len(d.mu.copysets))
	for _, c := range d.mu.copysets {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ref.Key() < out[j].ref.Key() })
	return out
}

func (d *replicaDouble) statusLocked(c *doubleCopyset) *copysetpb.CopysetStatus {
	leader := c.peers[0].ChunkserverId
	for _, p := range c.peers {
		leader = min(leader, p.ChunkserverId)
	}
	st := &copysetpb.CopysetStatus{
		Copyset: proto.CloneOf(c.ref), ChunkserverId: d.mu.id, Role: copysetpb.Role_ROLE_FOLLOWER, LeaderId: leader,
		Peers: c.peers, Term: 1, CommitIndex: c.applied, AppliedIndex: c.applied,
		FirstLogIndex: 1, LastLogIndex: c.applied, InstallingSnapshot: c.installing,
		ChunkCount: uint64(len(c.store.List())),
	}
	if leader == d.mu.id {
		st.Role = copysetpb.Role_ROLE_LEADER
	}
	return st
}

func (d *replicaDouble) copyset(ref *commonpb.CopysetRef) *doubleCopyset {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.copysets[ref.Key()]
}

// setApplied sets the applied index the replica reports for a copyset.
func (d *replicaDouble) setApplied(ref *commonpb.CopysetRef, applied uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.copysets[ref.Key()].applied = applied
}

// setInstalling sets whether the replica reports a snapshot install.
func (d *replicaDouble) setInstalling(ref *commonpb.CopysetRef, installing bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.copysets[ref.Key()].installing = installing
}

// chunkPath is the file of a chunk of a copyset on this replica.
func (d *replicaDouble) chunkPath(ref *commonpb.CopysetRef, chunkID uint64) string {
	return filepath.Join(d.copyset(ref).store.Dir(), fmt.Sprintf("chunk_%d", chunkID))
}

type doubleCopysetService struct {
	copysetpb.UnimplementedCopysetServiceServer
	d *replicaDouble
}

func (s doubleCopysetService) CreateCopysets(ctx context.Context, r *copysetpb.CreateCopysetsRequest) (*copysetpb.CreateCopysetsResponse, error) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	created := uint32(0)
	for _, spec := range r.Copysets {
		k := spec.Copyset.Key()
		if _, ok := d.mu.copysets[k]; ok {
			continue
		}
		dir := filepath.Join(d.dir, "copysets", fmt.Sprintf("%d-%d", spec.Copyset.LogicalPoolId, spec.Copyset.CopysetId), "chunks")
		st, err := datastore.Open(dir, d.pool, datastore.Options{})
		if err != nil {
			return nil, err
		}
		peers := make([]*commonpb.Peer, len(spec.Peers))
		for i, p := range spec.Peers {
			peers[i] = proto.CloneOf(p)
		}
		d.mu.copysets[k] = &doubleCopyset{ref: proto.CloneOf(spec.Copyset), peers: peers, store: st}
		created++
	}
	return &copysetpb.CreateCopysetsResponse{Created: created}, nil
}

func (s doubleCopysetService) GetCopysetStatus(ctx context.Context, r *copysetpb.GetCopysetStatusRequest) (*copysetpb.GetCopysetStatusResponse, error) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	resp := &copysetpb.GetCopysetStatusResponse{}
	if len(r.Copysets) == 0 {
		for _, c := range d.sortedLocked() {
			resp.Copysets = append(resp.Copysets, d.statusLocked(c))
		}
		return resp, nil
	}
	for _, ref := range r.Copysets {
		if c := d.mu.copysets[ref.Key()]; c != nil {
			resp.Copysets = append(resp.Copysets, d.statusLocked(c))
		} else {
			resp.Missing = append(resp.Missing, proto.CloneOf(ref))
		}
	}
	return resp, nil
}

type doubleChunkService struct {
	chunkpb.UnimplementedChunkServiceServer
	d *replicaDouble
}

func (s doubleChunkService) GetChunkInfo(ctx context.Context, r *chunkpb.GetChunkInfoRequest) (*chunkpb.GetChunkInfoResponse, error) {
	c := s.d.copyset(r.Copyset)
	if c == nil {
		return &chunkpb.GetChunkInfoResponse{Status: chunkpb.Status_STATUS_COPYSET_NOTEXIST}, nil
	}
	s.d.mu.Lock()
	applied := c.applied
	s.d.mu.Unlock()
	info, err := c.store.Info(r.ChunkId)
	switch {
	case errors.Is(err, datastore.ErrChunkNotExist):
		return &chunkpb.GetChunkInfoResponse{Status: chunkpb.Status_STATUS_OK, AppliedIndex: applied}, nil
	case err != nil:
		return &chunkpb.GetChunkInfoResponse{Status: chunkpb.Status_STATUS_INTERNAL_ERROR, Message: err.Error()}, nil
	}
	return &chunkpb.GetChunkInfoResponse{Status: chunkpb.Status_STATUS_OK, Exists: true, Size: uint64(info.Size),
		Sn: info.SN, CreatedSn: info.CreatedSN, AppliedIndex: applied}, nil
}

func (s doubleChunkService) GetChunkHash(ctx context.Context, r *chunkpb.GetChunkHashRequest) (*chunkpb.GetChunkHashResponse, error) {
	c := s.d.copyset(r.Copyset)
	if c == nil {
		return &chunkpb.GetChunkHashResponse{Status: chunkpb.Status_STATUS_COPYSET_NOTEXIST}, nil
	}
	s.d.mu.Lock()
	applied := c.applied
	s.d.mu.Unlock()
	crc, err := c.store.Hash(r.ChunkId, int64(r.Offset), int64(r.Length))
	switch {
	case errors.Is(err, datastore.ErrChunkNotExist):
		n := r.Length
		if n == 0 {
			n = testConstants.ChunkSize - r.Offset
		}
		zeros := crc32.Checksum(make([]byte, n), crc32.MakeTable(crc32.Castagnoli))
		return &chunkpb.GetChunkHashResponse{Status: chunkpb.Status_STATUS_OK, Crc32C: zeros, AppliedIndex: applied}, nil
	case err != nil:
		return &chunkpb.GetChunkHashResponse{Status: chunkpb.Status_STATUS_INTERNAL_ERROR, Message: err.Error()}, nil
	}
	return &chunkpb.GetChunkHashResponse{Status: chunkpb.Status_STATUS_OK, Crc32C: crc, Exists: true, AppliedIndex: applied}, nil
}

// replicaCluster is a real MDS with three replica doubles in three zones.
type replicaCluster struct {
	*doubleCluster
	replicas []*replicaDouble
}

func newReplicaCluster(t *testing.T, perCS int) *replicaCluster {
	t.Helper()
	dc := newDoubleCluster(t, 0)
	c := &replicaCluster{doubleCluster: dc}
	for i := range 3 {
		d := startReplicaDouble(t, dc.conn, fmt.Sprintf("host-%d", i), fmt.Sprintf("zone-%d", i))
		c.replicas = append(c.replicas, d)
		dc.label(d.addr, fmt.Sprintf("cs%d__", d.id()))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, d := range c.replicas {
				_ = d.heartbeat(ctx, dc.conn.Heartbeats())
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	dc.waitOnline()
	// Segments are allocated only when the chunkservers report room for
	// them: wait until the pools are formatted and reported.
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := dc.conn.Topology().ListChunkServers(dc.ctx, &mdspb.ListChunkServersRequest{})
		if err != nil {
			return err
		}
		for _, cs := range resp.Chunkservers {
			if free := cs.GetCapacity().GetPoolFreeChunks(); free < 24 {
				return fmt.Errorf("chunkserver %d reports %d free chunk files", cs.Id, free)
			}
		}
		return nil
	})
	dc.mustRun("create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", fmt.Sprint(perCS), "--wait", "20s")
	soon.Succeeds(t, 10*time.Second, func() error {
		for _, cs := range dc.copysets() {
			if cs.LeaderId == 0 {
				return fmt.Errorf("copyset %s has no leader yet", cs.Id.Name())
			}
		}
		return nil
	})
	return c
}

// replica returns the double with chunkserver id id.
func (c *replicaCluster) replica(id uint64) *replicaDouble {
	for _, d := range c.replicas {
		if d.id() == id {
			return d
		}
	}
	c.t.Fatalf("no replica double %d", id)
	return nil
}

// writeAll writes data at off of a chunk on every replica of its copyset
// and advances their applied indexes: what replication would do.
func (c *replicaCluster) writeAll(ref *commonpb.CopysetRef, chunkID uint64, off int64, data []byte) {
	c.t.Helper()
	for _, d := range c.replicas {
		cs := d.copyset(ref)
		if cs == nil {
			continue
		}
		if err := cs.store.WriteAt(chunkID, data, off); err != nil {
			c.t.Fatal(err)
		}
		d.mu.Lock()
		cs.applied++
		d.mu.Unlock()
	}
}

// corrupt overwrites bytes of one replica's chunk file directly on disk, at
// a data offset (past the meta page), as a bad disk or a bug would.
func corrupt(t *testing.T, path string, dataOff int64, garbage []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(garbage, int64(testConstants.MetaPageSize)+dataOff); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}
