package ops

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/grpcconn"
)

// chunkServers reaches chunkservers over one cached connection each.
type chunkServers struct {
	conns *grpcconn.Cache
}

func newChunkServers(identity *certs.Source) *chunkServers {
	return &chunkServers{conns: grpcconn.NewCache("chunkserver", certs.DialOption(identity, certs.RoleChunkServer))}
}

// chunk returns the chunk service of the chunkserver at addr.
func (c *chunkServers) chunk(addr string) (chunkpb.ChunkServiceClient, error) {
	cc, err := c.conns.Get(addr)
	if err != nil {
		return nil, err
	}
	return chunkpb.NewChunkServiceClient(cc), nil
}

// copysets returns the copyset service of the chunkserver at addr.
func (c *chunkServers) copysets(addr string) (copysetpb.CopysetServiceClient, error) {
	cc, err := c.conns.Get(addr)
	if err != nil {
		return nil, err
	}
	return copysetpb.NewCopysetServiceClient(cc), nil
}

func (c *chunkServers) close() { c.conns.Close() }

// topology is one snapshot of the MDS's topology, fetched for a command.
type topology struct {
	zones        []*mdspb.Zone
	servers      []*mdspb.Server
	chunkservers []*mdspb.ChunkServer
	physical     []*mdspb.PhysicalPool
	logical      []*mdspb.LogicalPool
	csByID       map[uint64]*mdspb.ChunkServer
}

// fetchTopology reads zones, servers, chunkservers and pools.
func (a *app) fetchTopology(ctx context.Context) (*topology, error) {
	topo := a.conn.Topology()
	t := &topology{csByID: map[uint64]*mdspb.ChunkServer{}}
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	zr, err := topo.ListZones(cctx, &mdspb.ListZonesRequest{})
	if err != nil {
		return nil, rpcErr("list zones", err)
	}
	sr, err := topo.ListServers(cctx, &mdspb.ListServersRequest{})
	if err != nil {
		return nil, rpcErr("list servers", err)
	}
	cr, err := topo.ListChunkServers(cctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return nil, rpcErr("list chunkservers", err)
	}
	pr, err := topo.ListPools(cctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		return nil, rpcErr("list pools", err)
	}
	t.zones, t.servers, t.chunkservers = zr.Zones, sr.Servers, cr.Chunkservers
	t.physical, t.logical = pr.PhysicalPools, pr.LogicalPools
	for _, cs := range t.chunkservers {
		t.csByID[cs.Id] = cs
	}
	return t, nil
}

// listPools reads the physical and logical pools.
func (a *app) listPools(ctx context.Context) (*mdspb.ListPoolsResponse, error) {
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	pr, err := a.conn.Topology().ListPools(cctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		return nil, rpcErr("list pools", err)
	}
	return pr, nil
}

// resolveLogicalPool finds a logical pool by name or id.
func resolveLogicalPool(pools []*mdspb.LogicalPool, s string) (*mdspb.LogicalPool, error) {
	for _, p := range pools {
		if p.Name == s {
			return p, nil
		}
	}
	if id, err := strconv.ParseUint(s, 10, 32); err == nil {
		for _, p := range pools {
			if uint64(p.Id) == id {
				return p, nil
			}
		}
	}
	return nil, notFound(fmt.Errorf("logical pool %q does not exist", s))
}

// parseCopysetID reads POOL:COPYSET (POOL a logical pool id or name) or a
// bare COPYSET when the cluster has exactly one logical pool.
func parseCopysetID(s string, pools []*mdspb.LogicalPool) (*commonpb.CopysetRef, error) {
	poolPart, csPart, hasPool := strings.Cut(strings.TrimSpace(s), ":")
	if !hasPool {
		csPart = poolPart
	}
	cs, err := strconv.ParseUint(csPart, 10, 32)
	if err != nil || cs == 0 {
		return nil, usageError(fmt.Errorf("copyset id %q: want POOL:COPYSET (for example 1:7) or COPYSET", s))
	}
	if !hasPool {
		switch len(pools) {
		case 0:
			return nil, notFound(fmt.Errorf("copyset %q: no logical pool exists", s))
		case 1:
			return &commonpb.CopysetRef{LogicalPoolId: pools[0].Id, CopysetId: uint32(cs)}, nil
		default:
			return nil, usageError(fmt.Errorf("copyset id %q: the cluster has %d logical pools; name one as POOL:COPYSET", s, len(pools)))
		}
	}
	p, err := resolveLogicalPool(pools, poolPart)
	if err != nil {
		return nil, err
	}
	return &commonpb.CopysetRef{LogicalPoolId: p.Id, CopysetId: uint32(cs)}, nil
}

// copysetArg picks the copyset a command names as its argument or with
// --copyset (update leader and check copyset take it either way); "" when
// neither is given.
func copysetArg(args []string, flag string) (string, error) {
	switch {
	case len(args) > 1:
		return "", usageError(fmt.Errorf("one copyset at a time, got %d: %s", len(args), strings.Join(args, " ")))
	case len(args) == 1 && flag != "" && args[0] != flag:
		return "", usageError(fmt.Errorf("copyset %s given twice, as %s and --copyset %s", args[0], args[0], flag))
	case len(args) == 1:
		return args[0], nil
	}
	return flag, nil
}

// getCopysets resolves copysets to their MDS records (members with their
// current addresses, leader).
func (a *app) getCopysets(ctx context.Context, refs []*commonpb.CopysetRef) (map[uint64]*mdspb.Copyset, error) {
	out := map[uint64]*mdspb.Copyset{}
	const batch = 512
	for start := 0; start < len(refs); start += batch {
		cctx, cancel := a.callCtx(ctx)
		resp, err := a.conn.Topology().GetCopysets(cctx, &mdspb.GetCopysetsRequest{Copysets: refs[start:min(start+batch, len(refs))]})
		cancel()
		if err != nil {
			return nil, rpcErr("get copysets", err)
		}
		for _, c := range resp.Copysets {
			out[c.Id.Key()] = c
		}
	}
	return out, nil
}

// listCopysets reads the MDS's copyset records (poolID 0: every pool).
func (a *app) listCopysets(ctx context.Context, poolID uint32) ([]*mdspb.Copyset, error) {
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	resp, err := a.conn.Topology().ListCopysets(cctx, &mdspb.ListCopysetsRequest{LogicalPoolId: poolID})
	if err != nil {
		return nil, rpcErr("list copysets", err)
	}
	return resp.Copysets, nil
}
