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

// publishReadOnly is the publish context key telling the node whether the
// publication is read-only.
const publishReadOnly = "readOnly"

// ControllerPublishVolume publishes a volume to a node: the MDS records
// the publication, and from then on only that node may open the volume
// (for writing, when the publication is writable). A writable publication
// is refused while another node holds the volume, unless that node died
// (no live session): then the MDS fences it before this call returns.
func (c controller) ControllerPublishVolume(ctx context.Context, req *csipb.ControllerPublishVolumeRequest) (*csipb.ControllerPublishVolumeResponse, error) {
	name, node := req.GetVolumeId(), req.GetNodeId()
	switch {
	case name == "":
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	case node == "":
		return nil, status.Error(codes.InvalidArgument, "node id is required")
	case req.GetVolumeCapability() == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is required")
	}
	if err := checkCapabilities([]*csipb.VolumeCapability{req.GetVolumeCapability()}); err != nil {
		return nil, err
	}
	readOnly := req.GetReadonly() || readerOnly(req.GetVolumeCapability())
	defer c.d.lockVolume(name)()
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	if _, err := c.d.mds.Volumes().PublishVolume(cctx, &mdspb.PublishVolumeRequest{Name: name, Node: node, ReadOnly: readOnly}); err != nil {
		return nil, mdsErr(fmt.Sprintf("publish volume %q to node %q", name, node), err)
	}
	return &csipb.ControllerPublishVolumeResponse{PublishContext: map[string]string{publishReadOnly: strconv.FormatBool(readOnly)}}, nil
}

// ControllerUnpublishVolume removes a publication; removing a writable one
// fences the node before the call returns, so its late writes are refused.
// A volume that does not exist counts as unpublished.
func (c controller) ControllerUnpublishVolume(ctx context.Context, req *csipb.ControllerUnpublishVolumeRequest) (*csipb.ControllerUnpublishVolumeResponse, error) {
	name, node := req.GetVolumeId(), req.GetNodeId()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	defer c.d.lockVolume(name)()
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	_, err := c.d.mds.Volumes().UnpublishVolume(cctx, &mdspb.UnpublishVolumeRequest{Name: name, Node: node})
	if err != nil && status.Code(err) != codes.NotFound {
		return nil, mdsErr(fmt.Sprintf("unpublish volume %q from node %q", name, node), err)
	}
	return &csipb.ControllerUnpublishVolumeResponse{}, nil
}

// readerOnly reports whether a capability's access mode only reads.
func readerOnly(vc *csipb.VolumeCapability) bool {
	switch vc.GetAccessMode().GetMode() {
	case csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		return true
	}
	return false
}
