package csi_test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

// TestVolumesFromSnapshotsAndVolumes: a volume from a snapshot and one
// from another volume are clones, readable at once with their source's
// data; the controller flattens them in the background, after which the
// snapshot can be deleted (refused with FAILED_PRECONDITION before), the
// hidden snapshot a volume-to-volume clone read is deleted by itself
// (and never listed), and the source volume can be deleted.
func TestVolumesFromSnapshotsAndVolumes(t *testing.T) {
	e := startWith(t, cluster.Options{SessionLease: 2 * time.Second})
	c := e.c
	create := func(name string, src *csipb.VolumeContentSource) *csipb.Volume {
		t.Helper()
		resp, err := e.ctl.CreateVolume(e.ctx, &csipb.CreateVolumeRequest{Name: name, VolumeCapabilities: e.caps,
			CapacityRange: &csipb.CapacityRange{RequiredBytes: seg}, VolumeContentSource: src})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		return resp.Volume
	}
	openVol := func(name string, o client.Options) *client.Volume {
		t.Helper()
		o.Logger = cluster.Logger()
		v, err := client.OpenWithOptions(e.ctx, []string{c.MDS.Addr()}, name, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		return v
	}
	read := func(name string) []byte {
		t.Helper()
		b := make([]byte, 2*mib)
		if _, err := openVol(name, client.Options{ReadOnly: true}).ReadAt(e.ctx, b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}

	create("src", nil)
	w := openVol("src", client.Options{})
	a := make([]byte, 2*mib)
	_, _ = rand.Read(a)
	if _, err := w.WriteAt(e.ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	snap, err := e.ctl.CreateSnapshot(e.ctx, &csipb.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: "src"})
	if err != nil {
		t.Fatal(err)
	}
	fromSnap := create("from-snap", &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{
		Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: snap.Snapshot.SnapshotId}}})
	if fromSnap.GetContentSource().GetSnapshot() == nil {
		t.Fatalf("content source not reported: %v", fromSnap)
	}
	fromVol := create("from-vol", &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{
		Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: "src"}}})
	if fromVol.GetContentSource().GetVolume() == nil {
		t.Fatalf("content source not reported: %v", fromVol)
	}
	b := bytes.Repeat([]byte{9}, int(mib))
	if _, err := w.WriteAt(e.ctx, b, 0); err != nil {
		t.Fatal(err)
	}
	if got := read("from-snap"); !bytes.Equal(got, a) {
		t.Fatal("the volume from a snapshot does not read the snapshot")
	}
	if got := read("from-vol"); !bytes.Equal(got, a) {
		t.Fatal("the volume from a volume does not read the volume as it was")
	}
	// Sources that do not exist, and sizes below the source's.
	_, err = e.ctl.CreateVolume(e.ctx, &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: e.caps,
		VolumeContentSource: &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{
			Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: "nope"}}}})
	wantCode(t, "clone of a missing volume", err, codes.NotFound, "nope")
	list, err := e.ctl.ListSnapshots(e.ctx, &csipb.ListSnapshotsRequest{})
	if err != nil || len(list.Entries) != 1 {
		t.Fatalf("list snapshots shows %v (want only snap-1), %v", list.GetEntries(), err)
	}

	// The flattener makes both independent: the snapshot goes, then the
	// source.
	soon.Succeeds(t, time.Minute, func() error {
		_, err := e.ctl.DeleteSnapshot(e.ctx, &csipb.DeleteSnapshotRequest{SnapshotId: snap.Snapshot.SnapshotId})
		if err != nil && status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("delete snapshot: %v", err)
		}
		return err
	})
	soon.Succeeds(t, time.Minute, func() error {
		resp, err := c.Conn.Volumes().ListSnapshots(e.ctx, &mdspb.ListSnapshotsRequest{Volume: "src"})
		if err != nil {
			return err
		}
		for _, s := range resp.Snapshots {
			if strings.HasPrefix(s.Name, "csi-clone-source-") && s.Status != mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING {
				return fmt.Errorf("hidden snapshot %s still %s", s.Name, s.Status.Label())
			}
		}
		return nil
	})
	w.Close()
	if _, err := e.ctl.DeleteVolume(e.ctx, &csipb.DeleteVolumeRequest{VolumeId: "src"}); err != nil {
		t.Fatalf("delete the source volume: %v", err)
	}
	if got := read("from-snap"); !bytes.Equal(got, a) {
		t.Fatal("the volume from a snapshot changed when its source went")
	}
	if got := read("from-vol"); !bytes.Equal(got, a) {
		t.Fatal("the volume from a volume changed when its source went")
	}
}
