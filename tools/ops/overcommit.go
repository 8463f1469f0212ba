package ops

import (
	"context"
	"fmt"

	"cairn.io/cairn/api/mdspb"
)

// overcommitNote says, when the volumes of v's logical pool provision more
// than its chunkservers can hold (thin provisioning), how far; "" when they
// do not or the figures cannot be read (the note is advice, never an error).
func (a *app) overcommitNote(ctx context.Context, v *mdspb.Volume) string {
	topo, err := a.fetchTopology(ctx)
	if err != nil {
		return ""
	}
	var lp *mdspb.LogicalPool
	for _, p := range topo.logical {
		if p.Id == v.LogicalPoolId {
			lp = p
		}
	}
	if lp == nil || lp.Replicas == 0 {
		return ""
	}
	zonePool := map[uint32]uint32{}
	for _, z := range topo.zones {
		zonePool[z.Id] = z.PhysicalPoolId
	}
	var chunks uint64
	for _, cs := range topo.chunkservers {
		if zonePool[cs.ZoneId] != lp.PhysicalPoolId || cs.RwState == mdspb.RWState_RW_STATE_RETIRED {
			continue
		}
		c := cs.GetCapacity()
		chunks += c.GetPoolUsedChunks() + c.AvailableChunks()
	}
	holds := chunks * v.ChunkSize / uint64(lp.Replicas)
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	vols, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
	if err != nil || holds == 0 {
		return ""
	}
	var provisioned uint64
	for _, x := range vols.Volumes {
		if x.LogicalPoolId == lp.Id && x.Status == mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
			provisioned += x.Size
		}
	}
	if provisioned <= holds {
		return ""
	}
	return fmt.Sprintf("the volumes of pool %s now provision %s, %.1fx the %s its chunkservers can hold with %d replicas: writes fail with no space once that is used up",
		lp.Name, formatBytes(provisioned), float64(provisioned)/float64(holds), formatBytes(holds), lp.Replicas)
}
