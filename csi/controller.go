package csi

import (
	"context"
	"fmt"
	"slices"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
)

// ParamPool is the StorageClass parameter naming the logical pool.
const ParamPool = "pool"

// defaultCapacity is the size of a volume created without a capacity
// range: 1 GiB (rounded up to whole segments).
const defaultCapacity = 1 << 30

// owner is recorded on the volumes the driver creates.
const owner = "csi.cairn.io"

// controller is the CSI controller service. Calls for capabilities it does
// not advertise (cloning, volume health) answer UNIMPLEMENTED.
type controller struct {
	csipb.UnimplementedControllerServer
	d *Driver
}

// ControllerGetCapabilities lists what the controller does.
func (c controller) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	var caps []*csipb.ControllerServiceCapability
	for _, t := range []csipb.ControllerServiceCapability_RPC_Type{
		csipb.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csipb.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csipb.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csipb.ControllerServiceCapability_RPC_GET_CAPACITY,
		csipb.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csipb.ControllerServiceCapability_RPC_PUBLISH_READONLY,
		csipb.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csipb.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csipb.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csipb.ControllerServiceCapability{Type: &csipb.ControllerServiceCapability_Rpc{
			Rpc: &csipb.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csipb.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// CreateVolume creates a Cairn volume named by the request, or returns the
// one of that name when it matches.
func (c controller) CreateVolume(ctx context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume name is required")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	src := req.GetVolumeContentSource()
	pool := ""
	for k, v := range req.GetParameters() {
		switch k {
		case ParamPool:
			pool = v
		default:
			if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
				return nil, status.Errorf(codes.InvalidArgument, "unknown parameter %q (known: %s)", k, ParamPool)
			}
		}
	}
	geo, err := c.geometry(ctx)
	if err != nil {
		return nil, err
	}
	size, err := capacity(req.GetCapacityRange(), geo.SegmentSize, defaultCapacity)
	if err != nil {
		return nil, err
	}
	defer c.d.lockVolume(name)()
	if v, err := c.stat(ctx, name); err == nil {
		if err := matches(v.Volume, req.GetCapacityRange(), pool, geo); err != nil {
			return nil, err
		}
		if err := sameSource(v.Volume, src, name); err != nil {
			return nil, err
		}
		vol := c.csiVolume(v.Volume, geo)
		vol.ContentSource = src
		return &csipb.CreateVolumeResponse{Volume: vol}, nil
	} else if status.Code(err) != codes.NotFound {
		return nil, err
	}
	if src != nil {
		if req.GetCapacityRange().GetRequiredBytes() == 0 {
			size = 0 // the source's size, or the range's limit
			if lim := req.GetCapacityRange().GetLimitBytes(); lim > 0 {
				size = uint64(lim) / geo.SegmentSize * geo.SegmentSize
			}
		}
		v, err := c.createClone(ctx, src, name, size, pool)
		if err != nil {
			return nil, err
		}
		vol := c.csiVolume(v, geo)
		vol.ContentSource = src
		return &csipb.CreateVolumeResponse{Volume: vol}, nil
	}
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	resp, err := c.d.mds.Volumes().CreateVolume(cctx, &mdspb.CreateVolumeRequest{Name: name, Size: size, Owner: owner, Pool: pool})
	if err != nil {
		return nil, mdsErr(fmt.Sprintf("create volume %q", name), err)
	}
	c.d.log.Info("volume created", "volume", name, "size", resp.Volume.Size, "pool", pool)
	return &csipb.CreateVolumeResponse{Volume: c.csiVolume(resp.Volume, geo)}, nil
}

// DeleteVolume deletes a volume; an unknown one counts as deleted. A
// volume still published to a node or open for writing is refused (the
// MDS checks both in the same transaction as the delete).
func (c controller) DeleteVolume(ctx context.Context, req *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	name := req.GetVolumeId()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	defer c.d.lockVolume(name)()
	st, err := c.stat(ctx, name)
	if status.Code(err) == codes.NotFound {
		return &csipb.DeleteVolumeResponse{}, nil
	} else if err != nil {
		return nil, err
	}
	// The snapshots its clones read, once none does (else refused).
	if err := c.deleteHiddenSnapshots(ctx, st.Volume); err != nil {
		return nil, err
	}
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	if _, err := c.d.mds.Volumes().DeleteVolume(cctx, &mdspb.DeleteVolumeRequest{Name: name}); err != nil {
		if status.Code(err) == codes.NotFound {
			return &csipb.DeleteVolumeResponse{}, nil
		}
		return nil, mdsErr(fmt.Sprintf("delete volume %q", name), err)
	}
	c.d.log.Info("volume deleted", "volume", name)
	return &csipb.DeleteVolumeResponse{}, nil
}

// ControllerExpandVolume grows a volume; the node grows the filesystem of
// a mounted one.
func (c controller) ControllerExpandVolume(ctx context.Context, req *csipb.ControllerExpandVolumeRequest) (*csipb.ControllerExpandVolumeResponse, error) {
	name := req.GetVolumeId()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	if req.GetCapacityRange() == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity range is required")
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
			return nil, err
		}
	}
	geo, err := c.geometry(ctx)
	if err != nil {
		return nil, err
	}
	size, err := capacity(req.GetCapacityRange(), geo.SegmentSize, 0)
	if err != nil {
		return nil, err
	}
	defer c.d.lockVolume(name)()
	st, err := c.stat(ctx, name)
	if err != nil {
		return nil, err
	}
	v := st.Volume
	if v.Size < size {
		cctx, cancel := c.d.callCtx(ctx)
		defer cancel()
		resp, err := c.d.mds.Volumes().ExtendVolume(cctx, &mdspb.ExtendVolumeRequest{Name: name, NewSize: size})
		if err != nil {
			return nil, mdsErr(fmt.Sprintf("extend volume %q", name), err)
		}
		v = resp.Volume
		c.d.log.Info("volume extended", "volume", name, "size", v.Size)
	}
	block := req.GetVolumeCapability().GetBlock() != nil
	return &csipb.ControllerExpandVolumeResponse{CapacityBytes: int64(v.Size), NodeExpansionRequired: !block}, nil
}

// ValidateVolumeCapabilities confirms the capabilities the driver supports.
func (c controller) ValidateVolumeCapabilities(ctx context.Context, req *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	name := req.GetVolumeId()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are required")
	}
	if _, err := c.stat(ctx, name); err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	for k := range req.GetParameters() {
		if k != ParamPool && !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return &csipb.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("unknown parameter %q", k)}, nil
		}
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{Confirmed: &csipb.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

// ListVolumes lists volumes in name order; the token is the index of the
// next entry.
func (c controller) ListVolumes(ctx context.Context, req *csipb.ListVolumesRequest) (*csipb.ListVolumesResponse, error) {
	geo, err := c.geometry(ctx)
	if err != nil {
		return nil, err
	}
	vols, err := c.volumes(ctx)
	if err != nil {
		return nil, err
	}
	slices.SortFunc(vols, func(a, b *mdspb.Volume) int { return strings.Compare(a.Name, b.Name) })
	start, end, next, err := page(len(vols), req.GetMaxEntries(), req.GetStartingToken(), "volumes")
	if err != nil {
		return nil, err
	}
	out := &csipb.ListVolumesResponse{NextToken: next}
	for _, v := range vols[start:end] {
		out.Entries = append(out.Entries, &csipb.ListVolumesResponse_Entry{Volume: c.csiVolume(v, geo)})
	}
	return out, nil
}

// GetCapacity is what a new volume of the pool can still take: the free
// chunk files of its online chunkservers, divided by the replicas.
func (c controller) GetCapacity(ctx context.Context, req *csipb.GetCapacityRequest) (*csipb.GetCapacityResponse, error) {
	if caps := req.GetVolumeCapabilities(); len(caps) > 0 {
		if err := checkCapabilities(caps); err != nil {
			return &csipb.GetCapacityResponse{}, nil
		}
	}
	geo, err := c.geometry(ctx)
	if err != nil {
		return nil, err
	}
	pool, err := geo.pool(req.GetParameters()[ParamPool])
	if err != nil {
		return nil, err
	}
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	css, err := c.d.mds.Topology().ListChunkServers(cctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return nil, mdsErr("list chunkservers", err)
	}
	var free uint64
	for _, cs := range css.Chunkservers {
		if geo.zonePhys[cs.ZoneId] != pool.PhysicalPoolId || cs.OnlineState != mdspb.OnlineState_ONLINE_STATE_ONLINE ||
			cs.RwState != mdspb.RWState_RW_STATE_READWRITE {
			continue
		}
		free += cs.GetCapacity().AvailableChunks() * geo.ChunkSize
	}
	return &csipb.GetCapacityResponse{AvailableCapacity: int64(free / uint64(max(pool.Replicas, 1)))}, nil
}
