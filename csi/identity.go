package csi

import (
	"context"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"cairn.io/cairn/api/mdspb"
)

// identity is the CSI identity service.
type identity struct {
	csipb.UnimplementedIdentityServer
	d *Driver
}

// GetPluginInfo names the driver and its version.
func (i identity) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: DriverName, VendorVersion: i.d.cfg.Version}, nil
}

// GetPluginCapabilities says the driver has a controller service and grows
// volumes online.
func (i identity) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	return &csipb.GetPluginCapabilitiesResponse{Capabilities: []*csipb.PluginCapability{
		{Type: &csipb.PluginCapability_Service_{Service: &csipb.PluginCapability_Service{
			Type: csipb.PluginCapability_Service_CONTROLLER_SERVICE}}},
		{Type: &csipb.PluginCapability_VolumeExpansion_{VolumeExpansion: &csipb.PluginCapability_VolumeExpansion{
			Type: csipb.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

// Probe is ready while the MDS answers, for the controller. A node plugin
// is ready while it serves: a liveness probe that failed with the MDS would
// restart its container, and that kills the attach processes of every
// volume mounted on the node.
func (i identity) Probe(ctx context.Context, _ *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	if i.d.cfg.Mode != ModeController {
		return &csipb.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
	}
	cctx, cancel := i.d.callCtx(ctx)
	defer cancel()
	if _, err := i.d.mds.Topology().ListPools(cctx, &mdspb.ListPoolsRequest{}); err != nil {
		i.d.log.Warn("probe: the MDS does not answer", "err", err)
		return &csipb.ProbeResponse{Ready: wrapperspb.Bool(false)}, nil
	}
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}
