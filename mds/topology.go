package mds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/commonpb"
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
	if err := l.checkRegistration(r); err != nil {
		return nil, err
	}
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	l.mu.Lock()
	existing, replaced, err := l.registeredLocked(r)
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if existing != nil {
		return l.registerAgain(ctx, existing, r)
	}
	return l.registerNew(ctx, r, replaced)
}

// checkRegistration refuses a registration with bad names, missing fields
// or other cluster constants.
func (l *leaderState) checkRegistration(r *mdspb.RegisterChunkServerRequest) error {
	for _, f := range []struct{ what, v string }{
		{"hostname", r.Hostname}, {"zone", r.Zone}, {"physical pool", r.PhysicalPool},
	} {
		if err := checkName(f.what, f.v); err != nil {
			return err
		}
	}
	if r.DataDir == "" || r.Address == "" {
		return status.Error(codes.InvalidArgument, "data_dir and address are required")
	}
	return constantsMismatch(r.Constants, l.consts)
}

// registeredLocked finds the chunkserver a registration is from, by id and
// token; nil when it is new. A registration without an identity from the
// host and data directory of a known chunkserver is a new disk (or a wiped
// one) in its place: it is new, and replaced names the chunkserver it
// replaces.
func (l *leaderState) registeredLocked(r *mdspb.RegisterChunkServerRequest) (existing, replaced *csEntry, err error) {
	if r.ChunkserverId != 0 {
		e := l.mu.chunkServers[r.ChunkserverId]
		if e == nil {
			return nil, nil, status.Errorf(codes.NotFound, "chunkserver %d is not registered", r.ChunkserverId)
		}
		if e.token != r.Token {
			return nil, nil, status.Errorf(codes.Unauthenticated, "chunkserver %d: token does not match", r.ChunkserverId)
		}
		return e, nil, nil
	}
	for _, e := range l.mu.chunkServers {
		if e.rec.Hostname == r.Hostname && e.rec.DataDir == r.DataDir && e.rec.RwState != mdspb.RWState_RW_STATE_RETIRED {
			if e.rec.Zone != r.Zone {
				return nil, nil, status.Errorf(codes.FailedPrecondition, "chunkserver %d at %s:%s is in zone %q, not %q", e.rec.Id, r.Hostname, r.DataDir, e.rec.Zone, r.Zone)
			}
			return nil, e, nil
		}
	}
	return nil, nil, nil
}

// registerAgain recognises a known chunkserver: it must come from the same
// place; a new address or capacity is recorded.
func (l *leaderState) registerAgain(ctx context.Context, existing *csEntry, r *mdspb.RegisterChunkServerRequest) (*mdspb.RegisterChunkServerResponse, error) {
	l.mu.Lock()
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

// placeLocked finds the physical pool, zone and server a new chunkserver
// joins; nil for those that do not exist yet. A known host must stay in its
// zone.
func (l *leaderState) placeLocked(r *mdspb.RegisterChunkServerRequest) (*mdspb.PhysicalPool, *mdspb.Zone, *mdspb.Server, error) {
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
		return nil, nil, nil, status.Errorf(codes.FailedPrecondition, "host %q is in zone %q (physical pool %d), not zone %q of physical pool %q",
			r.Hostname, z.GetName(), z.GetPhysicalPoolId(), r.Zone, r.PhysicalPool)
	}
	return pp, zone, server, nil
}

// registerNew registers a new chunkserver, creating its physical pool, zone
// and server when they do not exist, in one etcd transaction.
func (l *leaderState) registerNew(ctx context.Context, r *mdspb.RegisterChunkServerRequest, replaced *csEntry) (*mdspb.RegisterChunkServerResponse, error) {
	l.mu.Lock()
	pp, zone, server, err := l.placeLocked(r)
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var ops []clientv3.Op
	// create reserves an id from counter and adds the record's put.
	create := func(counter string, setID func(uint64), key func() string, rec proto.Message) error {
		id, err := l.st.reserveIDs(ctx, counter, 1)
		if err != nil {
			return err
		}
		setID(id)
		ops = append(ops, putOp(key(), rec))
		return nil
	}
	if pp == nil {
		pp = &mdspb.PhysicalPool{Name: r.PhysicalPool}
		if err := create(counterPhysicalPool, func(id uint64) { pp.Id = uint32(id) }, func() string { return l.st.k.physicalPool(pp.Id) }, pp); err != nil {
			return nil, err
		}
	}
	if zone == nil {
		zone = &mdspb.Zone{Name: r.Zone, PhysicalPoolId: pp.Id}
		if err := create(counterZone, func(id uint64) { zone.Id = uint32(id) }, func() string { return l.st.k.zone(zone.Id) }, zone); err != nil {
			return nil, err
		}
	}
	if server == nil {
		server = &mdspb.Server{Hostname: r.Hostname, ZoneId: zone.Id}
		if err := create(counterServer, func(id uint64) { server.Id = uint32(id) }, func() string { return l.st.k.server(server.Id) }, server); err != nil {
			return nil, err
		}
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
	var old *mdspb.ChunkServer
	if replaced != nil {
		l.mu.Lock()
		old = proto.CloneOf(replaced.rec)
		l.mu.Unlock()
		old.RwState = mdspb.RWState_RW_STATE_RETIRED
		ops = append(ops, putOp(l.st.k.chunkServer(old.Id), old))
	}
	if _, err := l.st.txn(ctx, nil, ops...); err != nil {
		return nil, err
	}
	l.mu.Lock()
	if old != nil {
		replaced.rec = old
	}
	l.mu.physPools[pp.Id] = pp
	l.mu.zones[zone.Id] = zone
	l.mu.servers[server.Id] = server
	l.mu.chunkServers[csID] = &csEntry{rec: rec, token: tok, physPool: pp.Id, capacity: r.Capacity}
	l.mu.Unlock()
	l.log.Info("chunkserver registered", "chunkserver", csID, "host", r.Hostname, "zone", r.Zone,
		"physical_pool", r.PhysicalPool, "address", r.Address)
	if old != nil {
		l.log.Warn("a new disk registered in place of a known chunkserver; the old one is retired and its replicas are rebuilt elsewhere",
			"retired", old.Id, "chunkserver", csID, "host", r.Hostname, "data_dir", r.DataDir)
	}
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
			return nil, status.Errorf(codes.NotFound, "copyset %s does not exist", ref.Name())
		}
		v := l.copysetViewLocked(c)
		l.addJoiningLocked(v)
		out.Copysets = append(out.Copysets, v)
	}
	return out, nil
}

// addJoiningLocked adds the target of a running add operator to a copyset's
// learners in a GetCopysets answer: chunkservers ask it who may speak for
// the copyset, and the leader makes the target a learner before its next
// report reaches the MDS. l.mu held.
func (l *leaderState) addJoiningLocked(v *mdspb.Copyset) {
	op := l.mu.operators[v.Id.Key()]
	if op == nil || op.Kind != mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER || l.mu.unsaved[op] {
		return
	}
	target := op.Target.GetChunkserverId()
	named := func(p *commonpb.Peer) bool { return p.ChunkserverId == target }
	if slices.ContainsFunc(v.Peers, named) || slices.ContainsFunc(v.Learners, named) {
		return
	}
	p := &commonpb.Peer{ChunkserverId: target}
	if e := l.mu.chunkServers[target]; e != nil {
		p.Address = e.rec.Address
	}
	v.Learners = append(v.Learners, p)
}
