package mdstest

import (
	"context"
	"fmt"
	"net"
	"sort"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// ChunkServerDouble stands in for a chunkserver in MDS tests (see the
// package comment).
type ChunkServerDouble struct {
	// Identity it registers with.
	Hostname, DataDir, Zone, PhysicalPool string
	// Addr is its gRPC address on loopback.
	Addr string

	grpc *grpc.Server

	mu struct {
		sync.Mutex
		id          uint64
		token       string
		copysets    map[uint64]*copysetpb.CopysetSpec
		leading     map[uint64]bool
		confEpoch   map[uint64]uint64
		term        map[uint64]uint64
		redirect    map[uint64]*chunkpb.LeaderHint
		epochs      map[uint64]uint64
		epochCalls  []*chunkpb.UpdateEpochRequest
		deletes     []*chunkpb.DeleteChunkRequest
		createCalls int
		failing     bool
		epochTable  uint64
		capacity    *mdspb.Capacity
		// oldVersion: heartbeats list no features (a chunkserver from
		// before clones).
		oldVersion bool
	}
}

// StartChunkServerDouble starts a double listening on 127.0.0.1:0; it stops
// when the test ends.
func StartChunkServerDouble(t testing.TB, hostname, zone, physicalPool string) *ChunkServerDouble {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("chunkserver double: listen: %v", err)
	}
	d := &ChunkServerDouble{
		Hostname: hostname, DataDir: "/data/" + hostname, Zone: zone, PhysicalPool: physicalPool,
		Addr: lis.Addr().String(), grpc: grpc.NewServer(),
	}
	d.mu.copysets = map[uint64]*copysetpb.CopysetSpec{}
	d.mu.leading = map[uint64]bool{}
	d.mu.confEpoch = map[uint64]uint64{}
	d.mu.term = map[uint64]uint64{}
	d.mu.redirect = map[uint64]*chunkpb.LeaderHint{}
	d.mu.epochs = map[uint64]uint64{}
	copysetpb.RegisterCopysetServiceServer(d.grpc, copysetService{d: d})
	chunkpb.RegisterChunkServiceServer(d.grpc, chunkService{d: d})
	go func() { _ = d.grpc.Serve(lis) }()
	t.Cleanup(d.Stop)
	return d
}

// Stop stops serving; later calls to it fail as to a dead chunkserver.
func (d *ChunkServerDouble) Stop() { d.grpc.Stop() }

// SetFailing makes every call to the double fail with UNAVAILABLE (true) or
// succeed again (false).
func (d *ChunkServerDouble) SetFailing(failing bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.failing = failing
}

// SetCapacity sets the capacity sent with registration and heartbeats.
func (d *ChunkServerDouble) SetCapacity(c *mdspb.Capacity) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.capacity = c
}

// SetOldVersion makes the double's heartbeats report no features, as a
// chunkserver that predates clones would.
func (d *ChunkServerDouble) SetOldVersion(old bool) {
	d.mu.Lock()
	d.mu.oldVersion = old
	d.mu.Unlock()
}

// ID returns the chunkserver id the MDS assigned (0 before Register).
func (d *ChunkServerDouble) ID() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.id
}

// Token returns the token the MDS assigned.
func (d *ChunkServerDouble) Token() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.token
}

// Register registers with the MDS, presenting the persisted id and token if
// it has them, as a chunkserver does at start.
func (d *ChunkServerDouble) Register(ctx context.Context, topo mdspb.TopologyServiceClient, consts *mdspb.ClusterConstants) error {
	d.mu.Lock()
	req := &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: d.DataDir, Zone: d.Zone, PhysicalPool: d.PhysicalPool,
		Address: d.Addr, Constants: consts, Capacity: proto.CloneOf(d.mu.capacity),
		ChunkserverId: d.mu.id, Token: d.mu.token,
	}
	d.mu.Unlock()
	resp, err := topo.RegisterChunkServer(ctx, req)
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.mu.id, d.mu.token = resp.ChunkserverId, resp.Token
	d.mu.Unlock()
	return nil
}

// LeadFirstPeers makes the double report itself leader of every copyset it
// hosts whose first peer it is (so that each copyset gets one leader).
func (d *ChunkServerDouble) LeadFirstPeers() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, spec := range d.mu.copysets {
		d.mu.leading[k] = len(spec.Peers) > 0 && spec.Peers[0].ChunkserverId == d.mu.id
	}
}

// SetLeading sets whether the double reports itself leader of a copyset, at
// the given term.
func (d *ChunkServerDouble) SetLeading(ref *commonpb.CopysetRef, leading bool, term uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.leading[ref.Key()] = leading
	d.mu.term[ref.Key()] = term
}

// SetConfEpoch sets the conf epoch the double reports for a copyset.
func (d *ChunkServerDouble) SetConfEpoch(ref *commonpb.CopysetRef, epoch uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.confEpoch[ref.Key()] = epoch
}

// SetPeers sets the members the double reports for a copyset, as after a
// membership change.
func (d *ChunkServerDouble) SetPeers(ref *commonpb.CopysetRef, peers []*commonpb.Peer) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if spec := d.mu.copysets[ref.Key()]; spec != nil {
		spec.Peers = peers
	}
}

// Host makes the double hold a replica of spec's copyset with spec's
// members at the given conf epoch, as after a membership change that added
// it or that it applied.
func (d *ChunkServerDouble) Host(spec *copysetpb.CopysetSpec, epoch uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	key := spec.Copyset.Key()
	d.mu.copysets[key] = proto.CloneOf(spec)
	d.mu.confEpoch[key] = epoch
}

// Drop makes the double forget its replica of a copyset, as after it was
// removed and trashed.
func (d *ChunkServerDouble) Drop(ref *commonpb.CopysetRef) {
	d.mu.Lock()
	defer d.mu.Unlock()
	key := ref.Key()
	delete(d.mu.copysets, key)
	delete(d.mu.leading, key)
	delete(d.mu.confEpoch, key)
	delete(d.mu.term, key)
}

// SetRedirect makes DeleteChunk on a copyset answer REDIRECTED with hint
// (nil to serve it again).
func (d *ChunkServerDouble) SetRedirect(ref *commonpb.CopysetRef, hint *chunkpb.LeaderHint) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if hint == nil {
		delete(d.mu.redirect, ref.Key())
	} else {
		d.mu.redirect[ref.Key()] = hint
	}
}

// Heartbeat sends one heartbeat with a report of every hosted copyset and
// applies the epoch table of the answer, as a chunkserver would.
func (d *ChunkServerDouble) Heartbeat(ctx context.Context, hb mdspb.HeartbeatServiceClient) (*mdspb.HeartbeatResponse, error) {
	d.mu.Lock()
	req := &mdspb.HeartbeatRequest{
		ChunkserverId: d.mu.id, Token: d.mu.token, Address: d.Addr,
		Capacity: proto.CloneOf(d.mu.capacity), EpochTableVersion: d.mu.epochTable,
	}
	if !d.mu.oldVersion {
		req.Features = []string{"clones"}
	}
	keys := make([]uint64, 0, len(d.mu.copysets))
	for k := range d.mu.copysets {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	for _, k := range keys {
		spec := d.mu.copysets[k]
		st := &copysetpb.CopysetStatus{
			Copyset: spec.Copyset, ChunkserverId: d.mu.id, Role: copysetpb.Role_ROLE_FOLLOWER,
			Peers: spec.Peers, ConfEpoch: d.mu.confEpoch[k], Term: max(d.mu.term[k], 1),
		}
		if d.mu.leading[k] {
			st.Role = copysetpb.Role_ROLE_LEADER
			st.LeaderId = d.mu.id
		}
		req.Copysets = append(req.Copysets, &mdspb.CopysetReport{Status: st})
	}
	d.mu.Unlock()
	resp, err := hb.Heartbeat(ctx, req)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if resp.EpochTableVersion > d.mu.epochTable {
		for _, e := range resp.Epochs {
			d.mu.epochs[e.VolumeId] = max(d.mu.epochs[e.VolumeId], e.Epoch)
		}
		d.mu.epochTable = resp.EpochTableVersion
	}
	return resp, nil
}

// Copysets returns the copysets the MDS asked the double to create.
func (d *ChunkServerDouble) Copysets() []*copysetpb.CopysetSpec {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]*copysetpb.CopysetSpec, 0, len(d.mu.copysets))
	for _, s := range d.mu.copysets {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Copyset.Key() < out[j].Copyset.Key() })
	return out
}

// Epoch returns the epoch the double holds for a volume.
func (d *ChunkServerDouble) Epoch(volumeID uint64) uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.epochs[volumeID]
}

// EpochCalls returns the UpdateEpoch calls received.
func (d *ChunkServerDouble) EpochCalls() []*chunkpb.UpdateEpochRequest {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*chunkpb.UpdateEpochRequest(nil), d.mu.epochCalls...)
}

// Deletes returns the DeleteChunk calls served (not the redirected ones).
func (d *ChunkServerDouble) Deletes() []*chunkpb.DeleteChunkRequest {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*chunkpb.DeleteChunkRequest(nil), d.mu.deletes...)
}

// CreateCalls returns how many CreateCopysets calls succeeded.
func (d *ChunkServerDouble) CreateCalls() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.createCalls
}

func (d *ChunkServerDouble) failingLocked() error {
	if d.mu.failing {
		return status.Error(codes.Unavailable, "chunkserver double: failing on purpose")
	}
	return nil
}

type copysetService struct {
	copysetpb.UnimplementedCopysetServiceServer
	d *ChunkServerDouble
}

func (s copysetService) CreateCopysets(ctx context.Context, r *copysetpb.CreateCopysetsRequest) (*copysetpb.CreateCopysetsResponse, error) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.failingLocked(); err != nil {
		return nil, err
	}
	created := uint32(0)
	for _, spec := range r.Copysets {
		k := spec.Copyset.Key()
		old, ok := d.mu.copysets[k]
		switch {
		case len(spec.Peers) == 0 && ok:
			continue // the replica an add fills exists already
		case len(spec.Peers) == 0:
			// An empty replica an add operator fills; it learns its
			// members from the leader.
			d.mu.copysets[k] = proto.CloneOf(spec)
			created++
			continue
		}
		if ok {
			if !samePeers(old.Peers, spec.Peers) {
				return nil, status.Errorf(codes.AlreadyExists, "copyset %s exists with other members", spec.Copyset.Name())
			}
			continue
		}
		member := false
		for _, p := range spec.Peers {
			member = member || p.ChunkserverId == d.mu.id
		}
		if !member {
			return nil, status.Errorf(codes.InvalidArgument, "chunkserver %d is not a member of copyset %s", d.mu.id, spec.Copyset.Name())
		}
		d.mu.copysets[k] = proto.CloneOf(spec)
		created++
	}
	d.mu.createCalls++
	return &copysetpb.CreateCopysetsResponse{Created: created}, nil
}

func samePeers(a, b []*commonpb.Peer) bool {
	if len(a) != len(b) {
		return false
	}
	ids := map[uint64]bool{}
	for _, p := range a {
		ids[p.ChunkserverId] = true
	}
	for _, p := range b {
		if !ids[p.ChunkserverId] {
			return false
		}
	}
	return true
}

type chunkService struct {
	chunkpb.UnimplementedChunkServiceServer
	d *ChunkServerDouble
}

func (s chunkService) UpdateEpoch(ctx context.Context, r *chunkpb.UpdateEpochRequest) (*chunkpb.UpdateEpochResponse, error) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.failingLocked(); err != nil {
		return nil, err
	}
	d.mu.epochCalls = append(d.mu.epochCalls, proto.CloneOf(r))
	d.mu.epochs[r.VolumeId] = max(d.mu.epochs[r.VolumeId], r.Epoch)
	return &chunkpb.UpdateEpochResponse{Status: chunkpb.Status_STATUS_OK, Epoch: d.mu.epochs[r.VolumeId]}, nil
}

func (s chunkService) DeleteChunk(ctx context.Context, r *chunkpb.DeleteChunkRequest) (*chunkpb.DeleteChunkResponse, error) {
	d := s.d
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.failingLocked(); err != nil {
		return nil, err
	}
	k := r.Copyset.Key()
	if _, ok := d.mu.copysets[k]; !ok {
		return &chunkpb.DeleteChunkResponse{Status: chunkpb.Status_STATUS_COPYSET_NOTEXIST,
			Message: fmt.Sprintf("copyset %s not hosted here", r.Copyset.Name())}, nil
	}
	if hint := d.mu.redirect[k]; hint != nil {
		return &chunkpb.DeleteChunkResponse{Status: chunkpb.Status_STATUS_REDIRECTED, Leader: proto.CloneOf(hint)}, nil
	}
	d.mu.deletes = append(d.mu.deletes, proto.CloneOf(r))
	return &chunkpb.DeleteChunkResponse{Status: chunkpb.Status_STATUS_OK}, nil
}
