package ops

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
)

// duParallel bounds the chunk lookups du keeps in flight.
const duParallel = 8

// duVolume is one volume's space: provisioned (its size), allocated (its
// segments) and used (the chunks ever written, which hold storage).
type duVolume struct {
	Name             string `json:"name"`
	ProvisionedBytes uint64 `json:"provisioned_bytes"`
	AllocatedBytes   uint64 `json:"allocated_bytes"`
	UsedBytes        uint64 `json:"used_bytes"`
	// SnapshotBytes is what the chunks keep for the volume's snapshots
	// (copied on write), per replica set like used.
	SnapshotBytes uint64 `json:"snapshot_bytes"`
	// ChunksWritten of ChunksAllocated hold data; ChunksUnknown could not
	// be asked (every replica failed to answer) and are not counted.
	ChunksWritten   int `json:"chunks_written"`
	ChunksAllocated int `json:"chunks_allocated"`
	ChunksUnknown   int `json:"chunks_unknown"`
}

type duResult struct {
	Volumes []duVolume `json:"volumes"`
	Total   duVolume   `json:"total"`
}

func (a *app) duCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "du [VOLUME...]",
		Short: "Show the space volumes use: provisioned, allocated (segments), used (chunks written) and kept for snapshots",
		Long: `du asks the chunkservers which chunks of each volume were ever written: a
volume's used space is those chunks (at chunk granularity, per replica set:
multiply by the pool's replicas for raw space). Allocated is its segments,
provisioned its size; snapshots is what the chunks keep of their past for the
volume's snapshots. Without names it covers every volume. It reads only
metadata and shows a progress bar on a terminal.`,
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			names := args
			if len(names) == 0 {
				cctx, cancel := a.callCtx(ctx)
				resp, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
				cancel()
				if err != nil {
					return rpcErr("list volumes", err)
				}
				for _, v := range resp.Volumes {
					if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
						names = append(names, v.Name)
					}
				}
				sort.Strings(names)
			}
			res := &duResult{Volumes: []duVolume{}, Total: duVolume{Name: "total"}}
			for _, name := range names {
				d, err := a.du(ctx, name)
				if err != nil {
					return err
				}
				res.Volumes = append(res.Volumes, *d)
				res.Total.add(d)
			}
			return a.emit(res)
		}),
	}
}

func (t *duVolume) add(d *duVolume) {
	t.ProvisionedBytes += d.ProvisionedBytes
	t.AllocatedBytes += d.AllocatedBytes
	t.UsedBytes += d.UsedBytes
	t.SnapshotBytes += d.SnapshotBytes
	t.ChunksWritten += d.ChunksWritten
	t.ChunksAllocated += d.ChunksAllocated
	t.ChunksUnknown += d.ChunksUnknown
}

// du measures one volume.
func (a *app) du(ctx context.Context, name string) (*duVolume, error) {
	v, nsegs, tasks, err := a.volumeChunks(ctx, name)
	if err != nil {
		return nil, err
	}
	d := &duVolume{Name: v.Name, ProvisionedBytes: v.Size, AllocatedBytes: uint64(nsegs) * v.SegmentSize, ChunksAllocated: len(tasks)}
	var mu sync.Mutex
	a.forEachChunk(ctx, tasks, duParallel, fmt.Sprintf("measuring %s", name), func(t chunkTask) {
		written, kept, known := a.chunkWritten(ctx, t)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case !known:
			d.ChunksUnknown++
		case written:
			d.ChunksWritten++
			d.SnapshotBytes += kept
		}
	})
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("du of volume %q: %w", name, err)
	}
	d.UsedBytes = uint64(d.ChunksWritten) * v.ChunkSize
	return d, nil
}

// chunkWritten asks the chunk's replicas whether it exists: written when
// one that answers holds it; kept is the most any keeps for snapshots;
// known is false when none answered.
func (a *app) chunkWritten(ctx context.Context, t chunkTask) (written bool, kept uint64, known bool) {
	if t.copyset == nil || len(t.copyset.Peers) == 0 {
		return false, 0, false
	}
	infos := a.fanOut(ctx, t, chunkInfoProbe(t))
	for _, r := range infos {
		if r.Error == "" {
			known = true
			written = written || r.Exists
			kept = max(kept, r.KeptBytes)
		}
	}
	return written, kept, known
}

func (r *duResult) writeTable(t *table) {
	t.row("VOLUME", "PROVISIONED", "ALLOCATED", "USED", "SNAPSHOTS", "CHUNKS WRITTEN")
	row := func(d duVolume) {
		chunks := fmt.Sprintf("%d of %d", d.ChunksWritten, d.ChunksAllocated)
		if d.ChunksUnknown > 0 {
			chunks += fmt.Sprintf(" (%d unknown: no replica answered)", d.ChunksUnknown)
		}
		t.row(d.Name, formatBytes(d.ProvisionedBytes), formatBytes(d.AllocatedBytes), formatBytes(d.UsedBytes), formatBytes(d.SnapshotBytes), chunks)
	}
	for _, d := range r.Volumes {
		row(d)
	}
	if len(r.Volumes) > 1 {
		row(r.Total)
	}
}
