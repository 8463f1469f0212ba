package mds

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds/placement"
)

// maxCopysetsPerChunkServer bounds CreateLogicalPool's copysets_per_chunkserver.
const maxCopysetsPerChunkServer = 1000

// createLogicalPool places the copysets of a new logical pool, records them,
// and asks every member chunkserver to create its copysets. Calling it again
// for a pool that exists returns the pool, resuming its creation if needed.
func (l *leaderState) createLogicalPool(ctx context.Context, r *mdspb.CreateLogicalPoolRequest) (*mdspb.CreateLogicalPoolResponse, error) {
	if err := checkName("logical pool name", r.Name); err != nil {
		return nil, err
	}
	if r.Replicas == 0 {
		r.Replicas = 3
	}
	if r.Replicas != 3 {
		return nil, status.Errorf(codes.InvalidArgument, "replicas %d: only 3 is supported", r.Replicas)
	}
	if r.CopysetsPerChunkserver == 0 {
		r.CopysetsPerChunkserver = 100
	}
	if r.CopysetsPerChunkserver > maxCopysetsPerChunkServer {
		return nil, status.Errorf(codes.InvalidArgument, "copysets_per_chunkserver %d exceeds %d", r.CopysetsPerChunkserver, maxCopysetsPerChunkServer)
	}
	pool, err := l.recordLogicalPool(ctx, r)
	if err != nil {
		return nil, err
	}
	if pool.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
		if pool, err = l.finishLogicalPool(ctx, pool.Id); err != nil {
			return nil, err
		}
	}
	return &mdspb.CreateLogicalPoolResponse{Pool: pool}, nil
}

// recordLogicalPool finds or records the pool and its placement.
func (l *leaderState) recordLogicalPool(ctx context.Context, r *mdspb.CreateLogicalPoolRequest) (*mdspb.LogicalPool, error) {
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	l.mu.Lock()
	var pp *mdspb.PhysicalPool
	for _, p := range l.mu.physPools {
		if p.Name == r.PhysicalPool {
			pp = p
		}
	}
	var pool *mdspb.LogicalPool
	for _, p := range l.mu.logicalPools {
		if p.Name == r.Name {
			pool = proto.CloneOf(p)
		}
	}
	var recorded int
	if pool != nil {
		recorded = len(l.poolCopysetsLocked(pool.Id))
	}
	l.mu.Unlock()
	if pool != nil {
		if pp == nil || pool.PhysicalPoolId != pp.Id {
			return nil, status.Errorf(codes.AlreadyExists, "logical pool %q exists over another physical pool (id %d)", r.Name, pool.PhysicalPoolId)
		}
		if recorded == int(pool.CopysetCount) {
			return pool, nil
		}
		// Creation stopped while its copysets were being recorded: no
		// chunkserver was asked yet, so place them afresh.
	}
	if pp == nil {
		return nil, status.Errorf(codes.NotFound, "physical pool %q does not exist (chunkservers create it when they register)", r.PhysicalPool)
	}
	req, zones := l.placementRequest(pp.Id, int(r.CopysetsPerChunkserver))
	placed, err := placement.Place(req, rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())))
	if errors.Is(err, placement.ErrTooFewZones) || errors.Is(err, placement.ErrInvalidArgument) {
		return nil, status.Errorf(codes.FailedPrecondition, "physical pool %q: %d usable chunkservers in %d zones; a logical pool needs chunkservers in at least 3 zones: %v",
			r.PhysicalPool, len(req.ChunkServers), zones, err)
	}
	if err != nil {
		return nil, err
	}
	if pool == nil {
		id, err := l.st.reserveIDs(ctx, counterLogicalPool, 1)
		if err != nil {
			return nil, err
		}
		pool = &mdspb.LogicalPool{Id: uint32(id), Name: r.Name, PhysicalPoolId: pp.Id}
	}
	pool.Replicas = r.Replicas
	pool.CopysetsPerChunkserver = r.CopysetsPerChunkserver
	pool.CopysetCount = uint32(len(placed))
	pool.Status = mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_CREATING
	// The pool record goes first (dropping any partial copysets); then the
	// copysets in batches. A pool whose copysets are incomplete is placed
	// again by the next call.
	if _, err := l.st.txn(ctx, nil, putOp(l.st.k.logicalPool(pool.Id), pool),
		clientv3.OpDelete(l.st.k.poolCopysets(pool.Id), clientv3.WithPrefix())); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.mu.logicalPools[pool.Id] = proto.CloneOf(pool)
	for k, c := range l.mu.copysets {
		if c.Id.LogicalPoolId == pool.Id {
			delete(l.mu.copysets, k)
		}
	}
	addr := map[uint64]string{}
	for id, e := range l.mu.chunkServers {
		addr[id] = e.rec.Address
	}
	l.mu.rr[pool.Id] = rand.IntN(len(placed))
	l.mu.Unlock()
	copysets := make([]*mdspb.Copyset, len(placed))
	for i, members := range placed {
		c := &mdspb.Copyset{Id: &commonpb.CopysetRef{LogicalPoolId: pool.Id, CopysetId: uint32(i + 1)}}
		for _, m := range members {
			c.Peers = append(c.Peers, &commonpb.Peer{ChunkserverId: m, Address: addr[m]})
		}
		copysets[i] = c
	}
	for start := 0; start < len(copysets); start += maxTxnOps {
		batch := copysets[start:min(start+maxTxnOps, len(copysets))]
		ops := make([]clientv3.Op, len(batch))
		for i, c := range batch {
			ops[i] = putOp(l.st.k.copyset(pool.Id, c.Id.CopysetId), c)
		}
		if _, err := l.st.txn(ctx, nil, ops...); err != nil {
			return nil, err
		}
		l.mu.Lock()
		for _, c := range batch {
			l.mu.copysets[c.Id.Key()] = c
		}
		l.mu.Unlock()
	}
	l.log.Info("logical pool placed", "pool", pool.Name, "id", pool.Id, "copysets", len(copysets),
		"chunkservers", len(req.ChunkServers), "zones", zones)
	return pool, nil
}

// placementRequest lists the chunkservers of a physical pool that can take
// copysets: READWRITE and not known OFFLINE.
func (l *leaderState) placementRequest(physPool uint32, perCS int) (placement.Request, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	req := placement.Request{Replicas: 3, PerChunkServer: perCS}
	zones := map[uint32]bool{}
	for _, e := range l.mu.chunkServers {
		if e.physPool != physPool || e.rec.RwState != mdspb.RWState_RW_STATE_READWRITE ||
			l.onlineStateLocked(e, now) == mdspb.OnlineState_ONLINE_STATE_OFFLINE {
			continue
		}
		req.ChunkServers = append(req.ChunkServers, placement.ChunkServer{ID: e.rec.Id, Zone: e.rec.ZoneId})
		zones[e.rec.ZoneId] = true
	}
	return req, len(zones)
}

// finishLogicalPool asks every member chunkserver of a CREATING pool to
// create its copysets and marks the pool READY when all did.
func (l *leaderState) finishLogicalPool(ctx context.Context, poolID uint32) (*mdspb.LogicalPool, error) {
	l.mu.Lock()
	pool := proto.CloneOf(l.mu.logicalPools[poolID])
	perCS := map[uint64][]*copysetpb.CopysetSpec{}
	addr := map[uint64]string{}
	for _, c := range l.poolCopysetsLocked(poolID) {
		v := l.copysetViewLocked(c)
		spec := &copysetpb.CopysetSpec{Copyset: v.Id, Peers: v.Peers}
		for _, p := range v.Peers {
			perCS[p.ChunkserverId] = append(perCS[p.ChunkserverId], spec)
			addr[p.ChunkserverId] = p.Address
		}
	}
	l.mu.Unlock()
	if pool == nil {
		return nil, status.Errorf(codes.NotFound, "logical pool %d does not exist", poolID)
	}
	ids := make([]uint64, 0, len(perCS))
	for id := range perCS {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	var (
		mu   sync.Mutex
		errs []string
		wg   sync.WaitGroup
		sem  = make(chan struct{}, 8)
	)
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func(id uint64) {
			defer wg.Done()
			defer func() { <-sem }()
			if err := l.createCopysetsOn(ctx, addr[id], perCS[id]); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Sprintf("chunkserver %d (%s): %v", id, addr[id], err))
				mu.Unlock()
			}
		}(id)
	}
	wg.Wait()
	if len(errs) > 0 {
		sort.Strings(errs)
		return nil, status.Errorf(codes.Aborted, "logical pool %q is recorded but %d of %d chunkservers did not create their copysets (the MDS keeps asking): %s",
			pool.Name, len(errs), len(ids), strings.Join(errs, "; "))
	}
	pool.Status = mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	if _, err := l.st.txn(ctx, nil, putOp(l.st.k.logicalPool(pool.Id), pool)); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.mu.logicalPools[pool.Id] = proto.CloneOf(pool)
	l.mu.Unlock()
	l.log.Info("logical pool ready", "pool", pool.Name, "id", pool.Id, "chunkservers", len(ids))
	return pool, nil
}

// createCopysetsOn sends a chunkserver its copysets, a few hundred per call.
func (l *leaderState) createCopysetsOn(ctx context.Context, addr string, specs []*copysetpb.CopysetSpec) error {
	cc, err := l.s.conns.Get(addr)
	if err != nil {
		return err
	}
	cli := copysetpb.NewCopysetServiceClient(cc)
	for start := 0; start < len(specs); start += 256 {
		cctx, cancel := context.WithTimeout(ctx, l.s.cfg.RPCTimeout)
		_, err := cli.CreateCopysets(cctx, &copysetpb.CreateCopysetsRequest{Copysets: specs[start:min(start+256, len(specs))]})
		cancel()
		if err != nil {
			return err
		}
	}
	return nil
}

// resumePools retries the creation of pools left CREATING.
func (l *leaderState) resumePools(ctx context.Context) {
	l.mu.Lock()
	var pending []*mdspb.LogicalPool
	for _, p := range l.mu.logicalPools {
		if p.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
			pending = append(pending, proto.CloneOf(p))
		}
	}
	l.mu.Unlock()
	for _, p := range pending {
		var err error
		if _, err = l.recordLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{
			Name: p.Name, PhysicalPool: l.physPoolName(p.PhysicalPoolId), Replicas: p.Replicas,
			CopysetsPerChunkserver: p.CopysetsPerChunkserver,
		}); err == nil {
			_, err = l.finishLogicalPool(ctx, p.Id)
		}
		if err != nil && ctx.Err() == nil {
			l.log.Warn("logical pool creation still incomplete", "pool", p.Name, "err", err)
		}
	}
}

func (l *leaderState) physPoolName(id uint32) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mu.physPools[id].GetName()
}
