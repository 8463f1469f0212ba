package mds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"sort"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
)

// checkName refuses empty names, names with '/' and overlong names.
func checkName(what, name string) error {
	if name == "" {
		return status.Errorf(codes.InvalidArgument, "%s is empty", what)
	}
	if len(name) > 255 {
		return status.Errorf(codes.InvalidArgument, "%s %q is longer than 255 bytes", what, name[:32]+"...")
	}
	for _, r := range name {
		if r == '/' || r < 0x20 || r == 0x7f {
			return status.Errorf(codes.InvalidArgument, "%s %q contains %q", what, name, r)
		}
	}
	return nil
}

func newToken() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func constantsMismatch(have, want *mdspb.ClusterConstants) error {
	var diffs []string
	add := func(name string, got, cluster uint64) {
		if got != cluster {
			diffs = append(diffs, name+" "+strconv.FormatUint(got, 10)+" (cluster: "+strconv.FormatUint(cluster, 10)+")")
		}
	}
	add("chunk size", have.GetChunkSize(), want.ChunkSize)
	add("segment size", have.GetSegmentSize(), want.SegmentSize)
	add("block size", uint64(have.GetBlockSize()), uint64(want.BlockSize))
	add("meta page size", uint64(have.GetMetaPageSize()), uint64(want.MetaPageSize))
	if len(diffs) == 0 {
		return nil
	}
	return status.Errorf(codes.FailedPrecondition,
		"chunkserver was formatted with other cluster constants: %s", strings.Join(diffs, ", "))
}

// registerChunkServer registers a chunkserver (or recognises it again) and
// creates its physical pool, zone and server on first use.
func (l *leaderState) registerChunkServer(ctx context.Context, r *mdspb.RegisterChunkServerRequest) (*mdspb.RegisterChunkServerResponse, error) {
	for _, f := range []struct{ what, v string }{
		{"hostname", r.Hostname}, {"zone", r.Zone}, {"physical pool", r.PhysicalPool},
	} {
		if err := checkName(f.what, f.v); err != nil {
			return nil, err
		}
	}
	if r.DataDir == "" || r.Address == "" {
		return nil, status.Error(codes.InvalidArgument, "data_dir and address are required")
	}
	if err := constantsMismatch(r.Constants, l.consts); err != nil {
		return nil, err
	}
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()

	l.mu.Lock()
	var existing *csEntry
	if r.ChunkserverId != 0 {
		existing = l.mu.chunkServers[r.ChunkserverId]
		if existing == nil {
			l.mu.Unlock()
			return nil, status.Errorf(codes.NotFound, "chunkserver %d is not registered", r.ChunkserverId)
		}
		if existing.token != r.Token {
			l.mu.Unlock()
			return nil, status.Errorf(codes.Unauthenticated, "chunkserver %d: token does not match", r.ChunkserverId)
		}
	} else {
		for _, e := range l.mu.chunkServers {
			if e.rec.Hostname == r.Hostname && e.rec.DataDir == r.DataDir {
				existing = e
				break
			}
		}
	}
	if existing != nil {
		pp := l.mu.physPools[existing.physPool]
		rec := proto.CloneOf(existing.rec)
		tok := existing.token
		l.mu.Unlock()
		switch {
		case rec.Zone != r.Zone:
			return nil, status.Errorf(codes.FailedPrecondition, "chunkserver %d is in zone %q, not %q", rec.Id, rec.Zone, r.Zone)
		case pp.GetName() != r.PhysicalPool:
			return nil, status.Errorf(codes.FailedPrecondition, "chunkserver %d is in physical pool %q, not %q", rec.Id, pp.GetName(), r.PhysicalPool)
		case rec.Hostname != r.Hostname || rec.DataDir != r.DataDir:
			return nil, status.Errorf(codes.FailedPrecondition, "chunkserver %d is %s:%s, not %s:%s", rec.Id, rec.Hostname, rec.DataDir, r.Hostname, r.DataDir)
		}
		if rec.Address != r.Address || r.Capacity != nil {
			rec.Address = r.Address
			if r.Capacity != nil {
				rec.Capacity = r.Capacity
			}
			if _, err := l.st.txn(ctx, nil, putOp(l.st.k.chunkServer(rec.Id), rec)); err != nil {
				return nil, err
			}
			l.mu.Lock()
			existing.rec = rec
			if r.Capacity != nil {
				existing.capacity = r.Capacity
			}
			l.mu.Unlock()
		}
		l.log.Info("chunkserver registered again", "chunkserver", rec.Id, "address", r.Address)
		return l.registerResponse(rec.Id, tok), nil
	}

	// A new chunkserver: find or create its physical pool, zone and server.
	var pp *mdspb.PhysicalPool
	for _, p := range l.mu.physPools {
		if p.Name == r.PhysicalPool {
			pp = p
		}
	}
	var zone *mdspb.Zone
	if pp != nil {
		for _, z := range l.mu.zones {
			if z.PhysicalPoolId == pp.Id && z.Name == r.Zone {
				zone = z
			}
		}
	}
	var server *mdspb.Server
	for _, sv := range l.mu.servers {
		if sv.Hostname == r.Hostname {
			server = sv
		}
	}
	if server != nil && (zone == nil || server.ZoneId != zone.Id) {
		z := l.mu.zones[server.ZoneId]
		l.mu.Unlock()
		return nil, status.Errorf(codes.FailedPrecondition, "host %q is in zone %q (physical pool %d), not zone %q of physical pool %q",
			r.Hostname, z.GetName(), z.GetPhysicalPoolId(), r.Zone, r.PhysicalPool)
	}
	l.mu.Unlock()

	var ops []clientv3.Op
	var err error
	if pp == nil {
		pp = &mdspb.PhysicalPool{Name: r.PhysicalPool}
		id, err := l.st.reserveIDs(ctx, counterPhysicalPool, 1)
		if err != nil {
			return nil, err
		}
		pp.Id = uint32(id)
		ops = append(ops, putOp(l.st.k.physicalPool(pp.Id), pp))
	}
	if zone == nil {
		zone = &mdspb.Zone{Name: r.Zone, PhysicalPoolId: pp.Id}
		id, err := l.st.reserveIDs(ctx, counterZone, 1)
		if err != nil {
			return nil, err
		}
		zone.Id = uint32(id)
		ops = append(ops, putOp(l.st.k.zone(zone.Id), zone))
	}
	if server == nil {
		server = &mdspb.Server{Hostname: r.Hostname, ZoneId: zone.Id}
		id, err := l.st.reserveIDs(ctx, counterServer, 1)
		if err != nil {
			return nil, err
		}
		server.Id = uint32(id)
		ops = append(ops, putOp(l.st.k.server(server.Id), server))
	}
	csID, err := l.st.reserveIDs(ctx, counterChunkServer, 1)
	if err != nil {
		return nil, err
	}
	rec := &mdspb.ChunkServer{
		Id: csID, ServerId: server.Id, ZoneId: zone.Id, Hostname: r.Hostname, Zone: r.Zone,
		Address: r.Address, DataDir: r.DataDir, RwState: mdspb.RWState_RW_STATE_READWRITE, Capacity: r.Capacity,
	}
	tok := newToken()
	ops = append(ops, putOp(l.st.k.chunkServer(csID), rec), clientv3.OpPut(l.st.k.token(csID), tok))
	if _, err := l.st.txn(ctx, nil, ops...); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.mu.physPools[pp.Id] = pp
	l.mu.zones[zone.Id] = zone
	l.mu.servers[server.Id] = server
	l.mu.chunkServers[csID] = &csEntry{rec: rec, token: tok, physPool: pp.Id, capacity: r.Capacity}
	l.mu.Unlock()
	l.log.Info("chunkserver registered", "chunkserver", csID, "host", r.Hostname, "zone", r.Zone,
		"physical_pool", r.PhysicalPool, "address", r.Address)
	return l.registerResponse(csID, tok), nil
}

func (l *leaderState) registerResponse(id uint64, token string) *mdspb.RegisterChunkServerResponse {
	return &mdspb.RegisterChunkServerResponse{
		ChunkserverId: id, Token: token, Constants: proto.CloneOf(l.consts),
		HeartbeatIntervalMs: uint32(l.s.cfg.HeartbeatInterval / time.Millisecond),
	}
}

func (l *leaderState) getChunkServer(r *mdspb.GetChunkServerRequest) (*mdspb.GetChunkServerResponse, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.mu.chunkServers[r.ChunkserverId]
	if e == nil {
		return nil, status.Errorf(codes.NotFound, "chunkserver %d is not registered", r.ChunkserverId)
	}
	return &mdspb.GetChunkServerResponse{Chunkserver: l.chunkServerViewLocked(e, time.Now(), l.copysetCountsLocked())}, nil
}

func (l *leaderState) listZones() *mdspb.ListZonesResponse {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := &mdspb.ListZonesResponse{}
	for _, z := range l.mu.zones {
		out.Zones = append(out.Zones, proto.CloneOf(z))
	}
	sort.Slice(out.Zones, func(i, j int) bool { return out.Zones[i].Id < out.Zones[j].Id })
	return out
}

func (l *leaderState) listServers() *mdspb.ListServersResponse {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := &mdspb.ListServersResponse{}
	for _, sv := range l.mu.servers {
		out.Servers = append(out.Servers, proto.CloneOf(sv))
	}
	sort.Slice(out.Servers, func(i, j int) bool { return out.Servers[i].Id < out.Servers[j].Id })
	return out
}

func (l *leaderState) listChunkServers() *mdspb.ListChunkServersResponse {
	l.mu.Lock()
	defer l.mu.Unlock()
	now, counts := time.Now(), l.copysetCountsLocked()
	out := &mdspb.ListChunkServersResponse{}
	for _, e := range l.mu.chunkServers {
		out.Chunkservers = append(out.Chunkservers, l.chunkServerViewLocked(e, now, counts))
	}
	sort.Slice(out.Chunkservers, func(i, j int) bool { return out.Chunkservers[i].Id < out.Chunkservers[j].Id })
	return out
}

func (l *leaderState) listPools() *mdspb.ListPoolsResponse {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := &mdspb.ListPoolsResponse{}
	for _, p := range l.mu.physPools {
		out.PhysicalPools = append(out.PhysicalPools, proto.CloneOf(p))
	}
	for _, p := range l.mu.logicalPools {
		out.LogicalPools = append(out.LogicalPools, proto.CloneOf(p))
	}
	sort.Slice(out.PhysicalPools, func(i, j int) bool { return out.PhysicalPools[i].Id < out.PhysicalPools[j].Id })
	sort.Slice(out.LogicalPools, func(i, j int) bool { return out.LogicalPools[i].Id < out.LogicalPools[j].Id })
	return out
}

func (l *leaderState) listCopysets(r *mdspb.ListCopysetsRequest) (*mdspb.ListCopysetsResponse, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if r.LogicalPoolId != 0 && l.mu.logicalPools[r.LogicalPoolId] == nil {
		return nil, status.Errorf(codes.NotFound, "logical pool %d does not exist", r.LogicalPoolId)
	}
	out := &mdspb.ListCopysetsResponse{}
	for _, c := range l.mu.copysets {
		if r.LogicalPoolId == 0 || c.Id.LogicalPoolId == r.LogicalPoolId {
			out.Copysets = append(out.Copysets, l.copysetViewLocked(c))
		}
	}
	sort.Slice(out.Copysets, func(i, j int) bool { return out.Copysets[i].Id.Key() < out.Copysets[j].Id.Key() })
	return out, nil
}

func (l *leaderState) getCopysets(r *mdspb.GetCopysetsRequest) (*mdspb.GetCopysetsResponse, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := &mdspb.GetCopysetsResponse{}
	for _, ref := range r.Copysets {
		c := l.mu.copysets[ref.Key()]
		if c == nil {
			return nil, status.Errorf(codes.NotFound, "copyset (%d, %d) does not exist", ref.GetLogicalPoolId(), ref.GetCopysetId())
		}
		out.Copysets = append(out.Copysets, l.copysetViewLocked(c))
	}
	return out, nil
}
