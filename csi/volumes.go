package csi

import (
	"context"
	"fmt"
	"strconv"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
)

// geometry is what the controller needs of the cluster: its constants,
// logical pools and zones.
type geometry struct {
	*mdspb.ClusterConstants
	pools    []*mdspb.LogicalPool
	zonePhys map[uint32]uint32 // zone id -> physical pool id
}

// geometry reads the cluster's constants, pools and zones.
func (c controller) geometry(ctx context.Context) (*geometry, error) {
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	cl, err := c.d.mds.Cluster().GetClusterStatus(cctx, &mdspb.GetClusterStatusRequest{})
	if err != nil {
		return nil, mdsErr("read the cluster's constants", err)
	}
	pools, err := c.d.mds.Topology().ListPools(cctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		return nil, mdsErr("list pools", err)
	}
	zones, err := c.d.mds.Topology().ListZones(cctx, &mdspb.ListZonesRequest{})
	if err != nil {
		return nil, mdsErr("list zones", err)
	}
	g := &geometry{ClusterConstants: cl.GetConstants(), pools: pools.LogicalPools, zonePhys: map[uint32]uint32{}}
	for _, z := range zones.Zones {
		g.zonePhys[z.Id] = z.PhysicalPoolId
	}
	if g.GetSegmentSize() == 0 {
		return nil, status.Error(codes.Unavailable, "the MDS reported no cluster constants")
	}
	return g, nil
}

// pool finds a logical pool by name; "" is the only (or first) one, as
// the MDS chooses for a volume created without a pool.
func (g *geometry) pool(name string) (*mdspb.LogicalPool, error) {
	for _, p := range g.pools {
		if p.Name == name || (name == "" && p.Id == g.pools[0].Id) {
			return p, nil
		}
	}
	if name == "" {
		return nil, status.Error(codes.FailedPrecondition, "the cluster has no logical pool")
	}
	return nil, status.Errorf(codes.InvalidArgument, "logical pool %q does not exist", name)
}

// poolName names a logical pool by id.
func (g *geometry) poolName(id uint32) string {
	for _, p := range g.pools {
		if p.Id == id {
			return p.Name
		}
	}
	return ""
}

// capacity turns a capacity range into a size: required bytes (def when
// none) rounded up to whole segments, within the limit.
func capacity(r *csipb.CapacityRange, segment uint64, def int64) (uint64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	switch {
	case req < 0 || lim < 0:
		return 0, status.Errorf(codes.InvalidArgument, "capacity range %d..%d has a negative bound", req, lim)
	case lim > 0 && req > lim:
		return 0, status.Errorf(codes.InvalidArgument, "required bytes %d exceed the limit %d", req, lim)
	}
	want := req
	if want == 0 {
		want = def
		if lim > 0 {
			want = min(def, lim)
		}
	}
	size := (uint64(max(want, 1)) + segment - 1) / segment * segment
	if lim > 0 && size > uint64(lim) {
		return 0, status.Errorf(codes.OutOfRange, "%d bytes rounded up to whole segments of %d is %d, over the limit %d", want, segment, size, lim)
	}
	return size, nil
}

// matches checks that an existing volume answers a create of the same
// name: its size within the range and its pool the one asked for.
func matches(v *mdspb.Volume, r *csipb.CapacityRange, pool string, g *geometry) error {
	if req := r.GetRequiredBytes(); req > 0 && v.Size < uint64(req) {
		return status.Errorf(codes.AlreadyExists, "volume %q exists with %d bytes, less than the %d required", v.Name, v.Size, req)
	}
	if lim := r.GetLimitBytes(); lim > 0 && v.Size > uint64(lim) {
		return status.Errorf(codes.AlreadyExists, "volume %q exists with %d bytes, over the limit %d", v.Name, v.Size, lim)
	}
	if pool != "" && g.poolName(v.LogicalPoolId) != pool {
		return status.Errorf(codes.AlreadyExists, "volume %q exists in pool %q, not %q", v.Name, g.poolName(v.LogicalPoolId), pool)
	}
	return nil
}

// stat reads a volume; NOT_FOUND when it does not exist or is being
// deleted.
func (c controller) stat(ctx context.Context, name string) (*mdspb.StatVolumeResponse, error) {
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	st, err := c.d.mds.Volumes().StatVolume(cctx, &mdspb.StatVolumeRequest{Name: name})
	if err != nil {
		return nil, mdsErr(fmt.Sprintf("volume %q", name), err)
	}
	if st.Volume.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
		return nil, status.Errorf(codes.NotFound, "volume %q is being deleted", name)
	}
	return st, nil
}

// csiVolume is a Cairn volume as CSI describes it.
func (c controller) csiVolume(v *mdspb.Volume, g *geometry) *csipb.Volume {
	return &csipb.Volume{
		VolumeId: v.Name, CapacityBytes: int64(v.Size),
		VolumeContext: map[string]string{ParamPool: g.poolName(v.LogicalPoolId)},
	}
}

// checkCapabilities refuses capabilities the driver does not serve: access
// modes where several nodes write, file systems other than ext4 and xfs.
func checkCapabilities(caps []*csipb.VolumeCapability) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	for _, vc := range caps {
		switch vc.GetAccessMode().GetMode() {
		case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
			csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		case csipb.VolumeCapability_AccessMode_UNKNOWN:
			return status.Error(codes.InvalidArgument, "volume capability without an access mode")
		default:
			return status.Errorf(codes.InvalidArgument, "access mode %s is not supported: a Cairn volume has one writer", vc.GetAccessMode().GetMode())
		}
		switch {
		case vc.GetBlock() != nil:
		case vc.GetMount() != nil:
			switch fs := vc.GetMount().GetFsType(); fs {
			case "", "ext4", "xfs":
			default:
				return status.Errorf(codes.InvalidArgument, "file system %q is not supported (ext4 or xfs)", fs)
			}
		default:
			return status.Error(codes.InvalidArgument, "volume capability without an access type (block or mount)")
		}
	}
	return nil
}

// page picks one page of n entries as ListVolumes and ListSnapshots take
// them: at most maxEntries (0: all) from the index the starting token
// names; next is the token of the page after ("" on the last). A negative
// max_entries is INVALID_ARGUMENT, a token this driver did not give ABORTED.
func page(n int, maxEntries int32, token, what string) (start, end int, next string, err error) {
	if maxEntries < 0 {
		return 0, 0, "", status.Errorf(codes.InvalidArgument, "max_entries %d is negative", maxEntries)
	}
	if token != "" {
		start, err = strconv.Atoi(token)
		if err != nil || start < 0 {
			return 0, 0, "", status.Errorf(codes.Aborted, "starting token %q is not one this driver gave", token)
		}
		if start > n {
			return 0, 0, "", status.Errorf(codes.Aborted, "starting token %q is past the %d %s", token, n, what)
		}
	}
	end = n
	if m := int(maxEntries); m > 0 && start+m < end {
		end = start + m
	}
	if end < n {
		next = strconv.Itoa(end)
	}
	return start, end, next, nil
}
