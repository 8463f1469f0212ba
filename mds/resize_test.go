package mds_test

import (
	"regexp"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
)

// TestShrink: a shrink needs to be allowed and is refused while the volume
// is open for writing or has snapshots; the segments beyond the new size
// are freed (their chunks deleted), and the volume grows again only after.
func TestShrink(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(4)
	c.heartbeatLoop(nil)
	const seg = 64 << 20 // testConstants' segment size
	c.createVolume("v", 3*seg)
	far := c.allocate("v", 2*seg)
	vols := c.conn.Volumes()
	_, err := vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "v", NewSize: seg})
	wantMessage(t, err, codes.InvalidArgument, regexp.QuoteMeta(`extend volume "v": it is 192MiB: shrinking it to 64MiB loses what lies beyond; allow the shrink to do it (use --allow-shrink)`))
	w, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "v", Writable: true, Features: []string{"clones"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "v", NewSize: seg, AllowShrink: true})
	wantMessage(t, err, codes.FailedPrecondition, `extend volume "v": it is open for writing by "[^"]*" \(session \S+\); close it before shrinking it`)
	if _, err := vols.CloseVolume(c.ctx, &mdspb.CloseVolumeRequest{Name: "v", SessionId: w.Session.SessionId}); err != nil {
		t.Fatal(err)
	}
	c.createVolume("snapped", 2*seg)
	if _, err := vols.CreateSnapshot(c.ctx, &mdspb.CreateSnapshotRequest{Volume: "snapped", Name: "s"}); err != nil {
		t.Fatal(err)
	}
	_, err = vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "snapped", NewSize: seg, AllowShrink: true})
	wantMessage(t, err, codes.FailedPrecondition, regexp.QuoteMeta(`extend volume "snapped": it has 1 snapshot(s), which read its chunks; delete them before shrinking it`))

	resp, err := vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "v", NewSize: seg, AllowShrink: true})
	if err != nil || resp.Volume.Size != seg || !resp.Volume.FreeingSegments {
		t.Fatalf("shrink: %v %v", resp.GetVolume(), err)
	}
	_, err = vols.GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "v", Offset: 2 * seg})
	wantCode(t, err, codes.InvalidArgument)
	// Grows again once the far segment is freed, and reads it as never
	// written.
	soon.Succeeds(t, 30*time.Second, func() error {
		_, err := vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "v", NewSize: 3 * seg})
		if err != nil {
			// Still freeing: says so once, in sizes an operator reads.
			wantMessage(t, err, codes.Unavailable, regexp.QuoteMeta(`extend volume "v": it was shrunk and the space beyond 64MiB is still being given back; grow it once that is done (seconds)`))
		}
		return err
	})
	_, err = vols.GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "v", Offset: 2 * seg})
	wantCode(t, err, codes.NotFound)
	deleted := map[uint64]bool{}
	for _, d := range c.css {
		for _, r := range d.Deletes() {
			deleted[r.ChunkId] = true
		}
	}
	for _, ref := range far.Chunks {
		if !deleted[ref.ChunkId] {
			t.Fatalf("chunk %d of the freed segment was not deleted", ref.ChunkId)
		}
	}
}
