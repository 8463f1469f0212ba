package mds_test

import (
	"fmt"
	"regexp"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
)

// TestTrash: a trashed volume frees its name and opens for nobody; it is
// restored under its name (refused while taken) or another, keeps its
// segments and snapshots, expires into deletion, or is purged; a volume
// whose snapshot a clone reads is not trashed, and a trashed clone keeps
// its source snapshot.
func TestTrash(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(4)
	c.heartbeatLoop(nil)
	const seg = 64 << 20
	v := c.createVolume("v", 2*seg)
	c.allocate("v", seg)
	vols := c.conn.Volumes()
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "v", Name: "s"}); err != nil {
		t.Fatal(err)
	}
	w, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v", Writable: true, Features: []string{"clones"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = vols.TrashVolume(c.ctx, &mdspb.TrashVolumeRequest{Name: "v"})
	wantMessage(t, err, codes.FailedPrecondition, `move volume "v" to the trash: it is open for writing by "[^"]*" \(session \S+\); close it first, or force it \(use --force\)`)
	_, err = vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "v"})
	wantMessage(t, err, codes.FailedPrecondition, regexp.QuoteMeta(`delete volume "v": it has 1 snapshot(s); delete them first, or force it (use --force)`))
	if _, err := vols.CloseVolume(c.ctx, &mdspb.CloseVolumeRequest{Name: "v", SessionId: w.Session.SessionId}); err != nil {
		t.Fatal(err)
	}
	tr, err := vols.TrashVolume(c.ctx, &mdspb.TrashVolumeRequest{Name: "v"})
	if err != nil || tr.Volume.Status != mdspb.VolumeStatus_VOLUME_STATUS_TRASHED || tr.Volume.TrashExpiresUnix < time.Now().Add(6*24*time.Hour).Unix() {
		t.Fatalf("trash: %v %v", tr.GetVolume(), err)
	}
	_, err = vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v"})
	wantCode(t, err, codes.NotFound)
	c.createVolume("v", seg) // the name is free
	_, err = vols.RestoreVolume(c.ctx, &mdspb.RestoreVolumeRequest{Id: v.Id})
	wantCode(t, err, codes.AlreadyExists)
	_, err = vols.RestoreVolume(c.ctx, &mdspb.RestoreVolumeRequest{Id: 9999})
	wantCode(t, err, codes.NotFound)
	back, err := vols.RestoreVolume(c.ctx, &mdspb.RestoreVolumeRequest{Id: v.Id, NewName: "v-back"})
	if err != nil || back.Volume.Name != "v-back" || len(back.Volume.Snapshots) != 1 {
		t.Fatalf("restore: %v %v", back.GetVolume(), err)
	}
	if _, err := vols.GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "v-back", Offset: seg}); err != nil {
		t.Fatalf("the restored volume lost its segment: %v", err)
	}

	// A clone of its snapshot keeps it out of the trash; a trashed clone
	// keeps its source.
	if _, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "cl", SourceVolume: "v-back", SourceSnapshot: "s"}); err != nil {
		t.Fatal(err)
	}
	_, err = vols.TrashVolume(c.ctx, &mdspb.TrashVolumeRequest{Name: "v-back"})
	wantMessage(t, err, codes.FailedPrecondition, `move volume "v-back" to the trash: snapshot v-back@s has clones that read from it: .*; flatten them first \(cairn-ops flatten VOLUME\) or delete them`)
	cl, err := vols.TrashVolume(c.ctx, &mdspb.TrashVolumeRequest{Name: "cl"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = vols.DeleteSnapshot(c.ctx, &mdspb.DeleteSnapshotRequest{Volume: "v-back", Name: "s"})
	wantCode(t, err, codes.FailedPrecondition)
	// Purged by id: the snapshot is free to go.
	if _, err := vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{TrashedId: cl.Volume.Id}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.DeleteSnapshot(c.ctx, &mdspb.DeleteSnapshotRequest{Volume: "v-back", Name: "s"}); err != nil {
		t.Fatalf("delete the snapshot of a purged clone: %v", err)
	}

	// Expired: deleted.
	tr, err = vols.TrashVolume(c.ctx, &mdspb.TrashVolumeRequest{Name: "v", ExpireSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := vols.ListVolumes(c.ctx, &mdspb.ListVolumesRequest{})
		if err != nil {
			return err
		}
		for _, x := range resp.Volumes {
			if x.Id == tr.Volume.Id {
				return fmt.Errorf("expired volume still listed: %v", x.Status)
			}
		}
		return nil
	})
	_, err = vols.RestoreVolume(c.ctx, &mdspb.RestoreVolumeRequest{Id: tr.Volume.Id})
	wantCode(t, err, codes.NotFound)
}
