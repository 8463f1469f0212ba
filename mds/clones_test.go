package mds_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
)

// TestCloneRecords: a clone and its snapshot record each other; a retry
// answers with the clone; what would strand it is refused (deleting the
// snapshot or its volume, renaming the volume, snapshotting the clone, a
// client that does not read clones, a pool with a chunkserver that does
// not know clones); the records survive an MDS restart; a flattened clone
// is released a session lease later once no snapshot of it taken before
// the flatten remains, after which the snapshot can go; a deleted clone
// no longer holds its snapshot.
func TestCloneRecords(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.SessionLease = 2 * time.Second })
	c.createPool(4)
	c.heartbeatLoop(nil)
	v := c.createVolume("src", 64<<20)
	vols := c.conn.Volumes()
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "src", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	clone := func(name string) (*mdspb.Volume, error) {
		resp, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: name, SourceVolume: "src", SourceSnapshot: "s1"})
		return resp.GetVolume(), err
	}

	// A chunkserver of the pool that predates clones.
	c.css[1].SetOldVersion(true)
	soon.Succeeds(t, 10*time.Second, func() error {
		_, err := clone("cl")
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "does not know clones") {
			return fmt.Errorf("clone with an old chunkserver in the pool: %v", err)
		}
		return nil
	})
	c.css[1].SetOldVersion(false)
	var cl *mdspb.Volume
	soon.Succeeds(t, 10*time.Second, func() error {
		var err error
		cl, err = clone("cl")
		return err
	})
	if cs := cl.GetCloneSource(); cs.GetVolumeId() != v.Id || cs.GetSeq() != 1 || cs.GetSize() != 64<<20 || cl.Size != 64<<20 {
		t.Fatalf("clone record %v", cl)
	}
	if again, err := clone("cl"); err != nil || again.Id != cl.Id {
		t.Fatalf("retried clone: %v %v", again, err)
	}
	stat, err := vols.StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "src"})
	if err != nil || len(stat.Volume.Snapshots[0].Clones) != 1 || stat.Volume.Snapshots[0].Clones[0] != cl.Id {
		t.Fatalf("snapshot's clones: %v %v", stat.GetVolume().GetSnapshots(), err)
	}

	refusals := func(when string) {
		t.Helper()
		_, err := vols.DeleteSnapshot(c.ctx, &mdspb.DeleteSnapshotRequest{Volume: "src", Name: "s1"})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cl") {
			t.Fatalf("%s: delete the snapshot: %v", when, err)
		}
		_, err = vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "src", Force: true})
		wantCode(t, err, codes.FailedPrecondition)
		_, err = vols.RenameVolume(c.ctx, &mdspb.RenameVolumeRequest{Name: "src", NewName: "src2"})
		wantCode(t, err, codes.FailedPrecondition)
	}
	refusals("clone not flattened")
	// A snapshot of the clone before its flatten (it reads the source
	// where the clone owned nothing then).
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "cl", Name: "t0"}); err != nil {
		t.Fatalf("snapshot of a clone not flattened: %v", err)
	}
	_, err = vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "cl"})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "cl", Features: []string{"clones"}}); err != nil {
		t.Fatalf("open by a client that reads clones: %v", err)
	}
	_, err = vols.FlattenVolume(c.ctx, &mdspb.FlattenVolumeRequest{Name: "src"})
	wantCode(t, err, codes.FailedPrecondition)

	// Through a restart of the MDS.
	c.mds.Stop()
	c.mds = startMDS(t, c.cfg, true)
	c.conn = dial(t, c.mds.Addr())
	vols = c.conn.Volumes()
	c.heartbeatLoop(nil)
	refusals("after an MDS restart")

	// Flattened: a snapshot may be taken at once; released a session
	// lease later; then the snapshot goes.
	f, err := vols.FlattenVolume(c.ctx, &mdspb.FlattenVolumeRequest{Name: "cl"})
	if err != nil || f.Volume.GetCloneSource().GetFlattenedUnix() == 0 {
		t.Fatalf("flatten: %v %v", f, err)
	}
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "cl", Name: "t"}); err != nil {
		t.Fatalf("snapshot of a flattened clone: %v", err)
	}
	refusals("flattened, not released")
	// Not released while t0 (taken before the flatten) remains.
	time.Sleep(c.cfg.SessionLease + 2*time.Second)
	if resp, err := vols.StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "cl"}); err != nil || resp.Volume.CloneSource == nil {
		t.Fatalf("released while a snapshot taken before the flatten remains: %v %v", resp.GetVolume(), err)
	}
	refusals("flattened, with a snapshot from before")
	if _, err := vols.DeleteSnapshot(c.ctx, &mdspb.DeleteSnapshotRequest{Volume: "cl", Name: "t0"}); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := vols.StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "cl"})
		if err != nil {
			return err
		}
		if resp.Volume.CloneSource != nil {
			return fmt.Errorf("clone source not released: %v", resp.Volume.CloneSource)
		}
		return nil
	})
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "cl"}); err != nil {
		t.Fatalf("open of a released clone by any client: %v", err)
	}
	if _, err := vols.DeleteSnapshot(c.ctx, &mdspb.DeleteSnapshotRequest{Volume: "src", Name: "s1"}); err != nil {
		t.Fatalf("delete the snapshot of a released clone: %v", err)
	}

	// A deleted clone holds nothing.
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "src", Name: "s2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "cl2", SourceVolume: "src", SourceSnapshot: "s2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "cl2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.DeleteSnapshot(c.ctx, &mdspb.DeleteSnapshotRequest{Volume: "src", Name: "s2"}); err != nil {
		t.Fatalf("delete the snapshot of a deleted clone: %v", err)
	}
}

// TestSnapshotsRefuseWhatPredatesThem: a snapshot is refused while a
// client that predates snapshots has the volume open for writing, or a
// chunkserver of the pool reported it predates them (their writes would
// not keep what the snapshot reads); a writable open of a volume with
// snapshots by such a client is refused.
func TestSnapshotsRefuseWhatPredatesThem(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(4)
	c.heartbeatLoop(nil)
	c.createVolume("v", 64<<20)
	vols := c.conn.Volumes()
	old, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v", Writable: true, Client: "old"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "v", Name: "s1"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), `"old"`) {
		t.Fatalf("snapshot while an old client writes: %v", err)
	}
	if _, err := vols.CloseVolume(c.ctx, &mdspb.CloseVolumeRequest{Name: "v", SessionId: old.Session.SessionId}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v", Writable: true, Client: "new", Features: []string{"clones"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "v", Name: "s1"}); err != nil {
		t.Fatalf("snapshot while a current client writes: %v", err)
	}
	_, err = vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v", Writable: true, Client: "old"})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v", Client: "old reader"}); err != nil {
		t.Fatalf("read-only open by an old client: %v", err)
	}
	c.css[2].SetOldVersion(true)
	soon.Succeeds(t, 10*time.Second, func() error {
		_, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "v", Name: "s2"})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "does not know snapshots") {
			return fmt.Errorf("snapshot with an old chunkserver in the pool: %v", err)
		}
		return nil
	})
}
