package csi

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
)

// Volumes from a snapshot or from another volume are Cairn clones (see
// docs/snapshots.md): created at once, reading their source snapshot where
// they were not written. The controller's flattener then copies what each
// clone it made still reads from its source, in the background; the MDS
// releases the source a session lease later. Until then the source
// snapshot cannot be deleted (DeleteSnapshot answers FAILED_PRECONDITION,
// which the external snapshotter retries). A volume from another volume
// is a clone of a hidden snapshot of it, named hiddenSnapshotPrefix and
// the clone's name; the flattener deletes it once released, and
// DeleteVolume deletes the hidden snapshots no clone reads any more.

// hiddenSnapshotPrefix begins the names of the snapshots a volume-to-volume
// clone reads; CSI does not list them, and refuses them as snapshot names.
const hiddenSnapshotPrefix = "csi-clone-source-"

// flattenEvery is how often the flattener looks for work when not kicked;
// flattenSoon how soon it looks again while clones wait for their release
// (or their flatten failed).
const (
	flattenEvery = 30 * time.Second
	flattenSoon  = 5 * time.Second
)

// hiddenGrace is how old a hidden snapshot whose clone does not exist must
// be before the flattener deletes it: a CreateVolume (of this controller
// or of one taking over) takes it, then makes the clone that reads it.
const hiddenGrace = 2 * time.Minute

// sameSource refuses (ALREADY_EXISTS) a create of an existing volume with
// a content source the volume was not made from, as far as its record
// still says (a released clone no longer names its source).
func sameSource(v *mdspb.Volume, src *csipb.VolumeContentSource, name string) error {
	cs := v.GetCloneSource()
	if src == nil || cs == nil {
		return nil
	}
	var volume, snap string
	switch {
	case src.GetSnapshot() != nil:
		volume, snap, _ = parseSnapshotID(src.GetSnapshot().GetSnapshotId())
	case src.GetVolume() != nil:
		volume, snap = src.GetVolume().GetVolumeId(), hiddenSnapshotPrefix+name
	}
	if cs.Volume != volume || cs.Snapshot != snap {
		return status.Errorf(codes.AlreadyExists, "volume %q exists as a clone of %s@%s, not of the content source asked for", name, cs.Volume, cs.Snapshot)
	}
	return nil
}

// createClone makes volume name a clone of the content source, of size
// bytes (0: the source's).
func (c controller) createClone(ctx context.Context, src *csipb.VolumeContentSource, name string, size uint64, pool string) (*mdspb.Volume, error) {
	var volume, snap string
	switch {
	case src.GetSnapshot() != nil:
		id := src.GetSnapshot().GetSnapshotId()
		var ok bool
		if volume, snap, ok = parseSnapshotID(id); !ok || strings.HasPrefix(snap, hiddenSnapshotPrefix) {
			return nil, status.Errorf(codes.NotFound, "snapshot %q does not exist", id)
		}
		st, err := c.stat(ctx, volume)
		if status.Code(err) == codes.NotFound {
			return nil, status.Errorf(codes.NotFound, "snapshot %q does not exist: %v", id, err)
		} else if err != nil {
			return nil, err
		}
		s := st.Volume.LiveSnapshot(snap)
		if s == nil || s.Status != mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY {
			return nil, status.Errorf(codes.NotFound, "snapshot %q does not exist (or is not ready)", id)
		}
		if size != 0 && size < s.Size {
			return nil, status.Errorf(codes.OutOfRange, "volume of %d bytes is smaller than snapshot %q (%d bytes)", size, id, s.Size)
		}
	case src.GetVolume() != nil:
		volume = src.GetVolume().GetVolumeId()
		st, err := c.stat(ctx, volume)
		if status.Code(err) == codes.NotFound {
			return nil, status.Errorf(codes.NotFound, "source volume %q does not exist", volume)
		} else if err != nil {
			return nil, err
		}
		if size != 0 && size < st.Volume.Size {
			return nil, status.Errorf(codes.OutOfRange, "volume of %d bytes is smaller than its source %q (%d bytes)", size, volume, st.Volume.Size)
		}
		snap = hiddenSnapshotPrefix + name
		cctx, cancel := c.d.callCtx(ctx)
		_, err = c.d.mds.Volumes().CreateSnapshot(cctx, &mdspb.CreateSnapshotRequest{Volume: volume, Name: snap})
		cancel()
		if err != nil && status.Code(err) != codes.AlreadyExists {
			return nil, mdsErr(fmt.Sprintf("snapshot source volume %q", volume), err)
		}
	default:
		return nil, status.Error(codes.InvalidArgument, "volume content source names neither a snapshot nor a volume")
	}
	cctx, cancel := c.d.callCtx(ctx)
	defer cancel()
	resp, err := c.d.mds.Volumes().CreateVolume(cctx, &mdspb.CreateVolumeRequest{
		Name: name, Size: size, Owner: owner, Pool: pool, SourceVolume: volume, SourceSnapshot: snap,
	})
	if err != nil {
		return nil, mdsErr(fmt.Sprintf("clone %s@%s as volume %q", volume, snap, name), err)
	}
	c.d.log.Info("volume created as a clone", "volume", name, "source", volume+"@"+snap)
	c.d.kickFlattener()
	return resp.Volume, nil
}

// deleteHiddenSnapshots deletes a volume's hidden snapshots that no clone
// reads any more (before the volume itself is deleted).
func (c controller) deleteHiddenSnapshots(ctx context.Context, v *mdspb.Volume) error {
	for _, s := range v.Snapshots {
		if !strings.HasPrefix(s.Name, hiddenSnapshotPrefix) || s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING {
			continue
		}
		cctx, cancel := c.d.callCtx(ctx)
		_, err := c.d.mds.Volumes().DeleteSnapshot(cctx, &mdspb.DeleteSnapshotRequest{Volume: v.Name, Name: s.Name})
		cancel()
		if err != nil && status.Code(err) != codes.NotFound {
			return mdsErr(fmt.Sprintf("delete volume %q: the snapshot its clone %q reads", v.Name, strings.TrimPrefix(s.Name, hiddenSnapshotPrefix)), err)
		}
	}
	return nil
}

// kickFlattener wakes the flattener (without waiting).
func (d *Driver) kickFlattener() {
	select {
	case d.flattenKick <- struct{}{}:
	default:
	}
}

// runFlattener flattens the clones this driver made, one at a time, and
// deletes the hidden snapshots released ones read, until ctx ends: at
// start (work an earlier controller left), when kicked, and every
// flattenEvery.
func (d *Driver) runFlattener(ctx context.Context) {
	defer close(d.flattenDone)
	t := time.NewTimer(0)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.flattenKick:
		}
		pending, err := d.flattenPass(ctx)
		if err != nil && ctx.Err() == nil {
			d.log.Warn("flattening clones", "err", err)
		}
		next := flattenEvery
		switch {
		case err != nil:
			// Back off while it keeps failing (a full pool, the MDS
			// away).
			failures++
			next = min(flattenSoon<<min(failures, 5), flattenEvery)
		case pending:
			failures = 0
			next = flattenSoon
		default:
			failures = 0
		}
		t.Stop()
		select {
		case <-t.C:
		default:
		}
		t.Reset(next)
	}
}

// flattenPass flattens every clone of this driver not flattened yet, and
// deletes the hidden snapshots no clone reads any more. pending reports
// clones that still wait for their release.
func (d *Driver) flattenPass(ctx context.Context) (pending bool, err error) {
	cctx, cancel := d.callCtx(ctx)
	resp, err := d.mds.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
	cancel()
	if err != nil {
		return false, fmt.Errorf("list volumes: %w", err)
	}
	var errs []error
	for _, v := range resp.Volumes {
		cs := v.GetCloneSource()
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED || v.Owner != owner || cs == nil {
			continue
		}
		pending = true
		if cs.FlattenedUnix != 0 {
			continue // released a session lease after its flatten
		}
		if err := d.flatten(ctx, v.Name); err != nil {
			errs = append(errs, err)
		}
	}
	exists := map[string]bool{}
	for _, v := range resp.Volumes {
		exists[v.Name] = v.Status == mdspb.VolumeStatus_VOLUME_STATUS_CREATED
	}
	for _, v := range resp.Volumes {
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
			continue
		}
		for _, s := range v.Snapshots {
			// The MDS refuses the deletion while a clone reads it (its
			// list may name clones deleted since). One whose clone is
			// not there may be in the middle of a CreateVolume.
			clone, hidden := strings.CutPrefix(s.Name, hiddenSnapshotPrefix)
			if !hidden || s.Status != mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY ||
				(!exists[clone] && time.Since(time.Unix(s.CreatedUnix, 0)) < hiddenGrace) {
				continue
			}
			if err := d.deleteHidden(ctx, v.Name, s.Name, clone); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return pending, errors.Join(errs...)
}

// deleteHidden deletes the hidden snapshot that clone read, under the
// clone's name lock (a CreateVolume of that clone takes the snapshot and
// makes the clone under it).
func (d *Driver) deleteHidden(ctx context.Context, volume, snap, clone string) error {
	defer d.lockVolume(clone)()
	cctx, cancel := d.callCtx(ctx)
	defer cancel()
	_, err := d.mds.Volumes().DeleteSnapshot(cctx, &mdspb.DeleteSnapshotRequest{Volume: volume, Name: snap})
	switch status.Code(err) {
	case codes.OK:
		d.log.Info("snapshot a clone read deleted", "volume", volume, "snapshot", snap)
	case codes.NotFound, codes.FailedPrecondition:
		// Gone, or read by a clone (being made) still.
	default:
		return fmt.Errorf("delete snapshot %s@%s: %w", volume, snap, err)
	}
	return nil
}

// flatten flattens one clone, logging its progress.
func (d *Driver) flatten(ctx context.Context, name string) error {
	start := time.Now()
	v, err := client.OpenWithOptions(ctx, d.cfg.MDSAddrs, name, client.Options{
		ReadOnly: true, TLS: d.cfg.TLS, Logger: d.cfg.Logger, ClientName: "csi.cairn.io controller (flatten)",
	})
	if errors.Is(err, client.ErrNotFound) {
		return nil // deleted meanwhile
	}
	if err != nil {
		return fmt.Errorf("flatten %q: %w", name, err)
	}
	defer v.Close()
	d.log.Info("flattening a clone", "volume", name)
	next := int64(0)
	copied, err := v.Flatten(ctx, func(done, total int64) {
		if total > 0 && done*10 >= next*total {
			d.log.Info("flattening a clone", "volume", name, "done_percent", done*100/total)
			next = done*10/total + 1
		}
	})
	switch {
	case errors.Is(err, client.ErrNotClone):
		return nil
	case err != nil:
		return fmt.Errorf("flatten %q: %w", name, err)
	}
	d.log.Info("clone flattened", "volume", name, "copied_bytes", copied, "took", time.Since(start).Round(time.Millisecond))
	return nil
}
