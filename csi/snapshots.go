package csi

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"cairn.io/cairn/api/mdspb"
)

// Snapshots: a CSI snapshot is a Cairn volume snapshot, its id
// VOLUME@NAME (NAME the CSI name, unique across the cluster's volumes). A
// volume created from a snapshot is a clone of it (clones.go).

// snapshotID is a snapshot's CSI id.
func snapshotID(volume, name string) string { return volume + "@" + name }

// parseSnapshotID splits a snapshot id; ok is false for one this driver
// does not make.
func parseSnapshotID(id string) (volume, name string, ok bool) {
	i := strings.LastIndexByte(id, '@')
	if i <= 0 || i == len(id)-1 {
		return "", "", false
	}
	return id[:i], id[i+1:], true
}

func csiSnapshot(volume string, s *mdspb.Snapshot) *csipb.Snapshot {
	return &csipb.Snapshot{
		SnapshotId: snapshotID(volume, s.Name), SourceVolumeId: volume, SizeBytes: int64(s.Size),
		CreationTime: timestamppb.New(time.Unix(s.CreatedUnix, 0)), ReadyToUse: s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY,
	}
}

// volumes lists the cluster's volumes that are not being deleted.
func (c controller) volumes(ctx context.Context) ([]*mdspb.Volume, error) {
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	resp, err := c.d.mds.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
	if err != nil {
		return nil, mdsErr("list volumes", err)
	}
	return slices.DeleteFunc(resp.Volumes, func(v *mdspb.Volume) bool { return v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED }), nil
}

// CreateSnapshot takes a crash-consistent snapshot of a volume, or returns
// the one of that name when it is of the same volume.
func (c controller) CreateSnapshot(ctx context.Context, req *csipb.CreateSnapshotRequest) (*csipb.CreateSnapshotResponse, error) {
	name, source := req.GetName(), req.GetSourceVolumeId()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "snapshot name is required")
	}
	if source == "" {
		return nil, status.Error(codes.InvalidArgument, "source volume id is required")
	}
	if strings.HasPrefix(name, hiddenSnapshotPrefix) {
		return nil, status.Errorf(codes.InvalidArgument, "snapshot name %q: names beginning %q are the driver's own", name, hiddenSnapshotPrefix)
	}
	defer c.d.lockVolume(source)()
	vols, err := c.volumes(ctx)
	if err != nil {
		return nil, err
	}
	for _, v := range vols {
		if v.Name != source && v.LiveSnapshot(name) != nil {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists of volume %q, not %q", name, v.Name, source)
		}
	}
	if _, err := c.stat(ctx, source); err != nil {
		return nil, err
	}
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	resp, err := c.d.mds.Volumes().CreateSnapshot(cctx, &mdspb.CreateSnapshotRequest{Volume: source, Name: name})
	if status.Code(err) == codes.AlreadyExists {
		// An older snapshot of the volume has the name: the same one.
		st, serr := c.stat(ctx, source)
		if serr == nil {
			if s := st.Volume.LiveSnapshot(name); s != nil {
				return &csipb.CreateSnapshotResponse{Snapshot: csiSnapshot(source, s)}, nil
			}
		}
	}
	if err != nil {
		return nil, mdsErr(fmt.Sprintf("snapshot volume %q", source), err)
	}
	c.d.log.Info("snapshot taken", "volume", source, "snapshot", name, "seq", resp.Snapshot.Seq)
	return &csipb.CreateSnapshotResponse{Snapshot: csiSnapshot(source, resp.Snapshot)}, nil
}

// DeleteSnapshot deletes a snapshot; an unknown one counts as deleted.
func (c controller) DeleteSnapshot(ctx context.Context, req *csipb.DeleteSnapshotRequest) (*csipb.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "snapshot id is required")
	}
	volume, name, ok := parseSnapshotID(id)
	if !ok || strings.HasPrefix(name, hiddenSnapshotPrefix) {
		return &csipb.DeleteSnapshotResponse{}, nil // no snapshot (of CSI's) has that id
	}
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	if _, err := c.d.mds.Volumes().DeleteSnapshot(cctx, &mdspb.DeleteSnapshotRequest{Volume: volume, Name: name}); err != nil {
		if status.Code(err) == codes.NotFound {
			return &csipb.DeleteSnapshotResponse{}, nil
		}
		return nil, mdsErr(fmt.Sprintf("delete snapshot %q", id), err)
	}
	c.d.log.Info("snapshot deleted", "snapshot", id)
	return &csipb.DeleteSnapshotResponse{}, nil
}

// ListSnapshots lists readable snapshots in id order, all or those of one
// id or one source volume; the token is the index of the next entry.
func (c controller) ListSnapshots(ctx context.Context, req *csipb.ListSnapshotsRequest) (*csipb.ListSnapshotsResponse, error) {
	vols, err := c.volumes(ctx)
	if err != nil {
		return nil, err
	}
	wantVol, wantName := req.GetSourceVolumeId(), ""
	if id := req.GetSnapshotId(); id != "" {
		v, n, ok := parseSnapshotID(id)
		if !ok || (wantVol != "" && wantVol != v) {
			return &csipb.ListSnapshotsResponse{}, nil
		}
		wantVol, wantName = v, n
	}
	var all []*csipb.Snapshot
	for _, v := range vols {
		if wantVol != "" && v.Name != wantVol {
			continue
		}
		for _, s := range v.Snapshots {
			if s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY && (wantName == "" || s.Name == wantName) && !strings.HasPrefix(s.Name, hiddenSnapshotPrefix) {
				all = append(all, csiSnapshot(v.Name, s))
			}
		}
	}
	slices.SortFunc(all, func(a, b *csipb.Snapshot) int { return strings.Compare(a.SnapshotId, b.SnapshotId) })
	start, end, next, err := page(len(all), req.GetMaxEntries(), req.GetStartingToken(), "snapshots")
	if err != nil {
		return nil, err
	}
	out := &csipb.ListSnapshotsResponse{NextToken: next}
	for _, s := range all[start:end] {
		out.Entries = append(out.Entries, &csipb.ListSnapshotsResponse_Entry{Snapshot: s})
	}
	return out, nil
}
