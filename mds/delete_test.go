package mds_test

import (
	"fmt"
	"testing"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
)

func TestDeleteFreesChunksOnCopysetLeaders(t *testing.T) {
	c := newCluster(t, 3, 2, nil)
	c.createPool(3)
	v := c.createVolume("vol0", 3*seg)
	s0 := c.allocate("vol0", 0)
	s2 := c.allocate("vol0", 2*seg)
	want := map[uint64]*mdspb.ChunkRef{}
	for _, s := range []*mdspb.Segment{s0, s2} {
		for _, ch := range s.Chunks {
			want[ch.ChunkId] = ch
		}
	}
	// One copyset's recorded leader redirects to another member, as a
	// leader that just lost its leadership would.
	cs, err := c.conn.Topology().GetCopysets(c.ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{s0.Chunks[0].Copyset}})
	if err != nil {
		t.Fatal(err)
	}
	moved := cs.Copysets[0]
	newLeader := moved.Peers[1]
	c.double(moved.LeaderId).SetRedirect(moved.Id, &chunkpb.LeaderHint{ChunkserverId: newLeader.ChunkserverId, Address: newLeader.Address})

	// The name is free at once; a new volume can take it.
	if _, err := c.conn.Volumes().DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "vol0"}); err != nil {
		t.Fatal(err)
	}
	c.createVolume("vol0", seg)
	soon.Succeeds(t, 10*time.Second, func() error {
		for _, vol := range listVolumes(t, c).Volumes {
			if vol.Id == v.Id {
				return fmt.Errorf("deleted volume %d still listed (%s)", v.Id, vol.Status)
			}
		}
		return nil
	})
	deletedOn := map[uint64]uint64{}
	for _, d := range c.css {
		for _, del := range d.Deletes() {
			if del.VolumeId != v.Id {
				t.Fatalf("delete for volume %d", del.VolumeId)
			}
			deletedOn[del.ChunkId] = d.ID()
		}
	}
	for id, ref := range want {
		on, ok := deletedOn[id]
		if !ok {
			t.Fatalf("chunk %d was never deleted", id)
		}
		info, err := c.conn.Topology().GetCopysets(c.ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{ref.Copyset}})
		if err != nil {
			t.Fatal(err)
		}
		wantOn := info.Copysets[0].LeaderId
		if ref.Copyset.CopysetId == moved.Id.CopysetId {
			wantOn = newLeader.ChunkserverId
		}
		if on != wantOn {
			t.Fatalf("chunk %d of copyset %d deleted on chunkserver %d, want %d", id, ref.Copyset.CopysetId, on, wantOn)
		}
	}
	if len(deletedOn) != len(want) {
		t.Fatalf("%d chunks deleted, want %d", len(deletedOn), len(want))
	}
}

func TestDeleteResumesWhenChunkServersReturn(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	s0 := c.allocate("vol0", 0)
	for _, d := range c.css {
		d.SetFailing(true)
	}
	if _, err := c.conn.Volumes().DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "vol0"}); err != nil {
		t.Fatal(err)
	}
	// While the chunks cannot be freed the volume stays, DELETING.
	l := listVolumes(t, c)
	if len(l.Volumes) != 1 || l.Volumes[0].Status != mdspb.VolumeStatus_VOLUME_STATUS_DELETING {
		t.Fatalf("volumes %v, want one DELETING", l.Volumes)
	}
	for _, d := range c.css {
		d.SetFailing(false)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := len(listVolumes(t, c).Volumes); n != 0 {
			return fmt.Errorf("%d volumes", n)
		}
		return nil
	})
	// Every chunk of the segment was deleted. A pass that the recovery
	// interrupted part-way is redone whole, so a chunk may be deleted twice
	// (deletes are idempotent: a missing chunk counts as deleted).
	deleted := map[uint64]bool{}
	for _, d := range c.css {
		for _, del := range d.Deletes() {
			if del.VolumeId != v.Id {
				t.Fatalf("delete for volume %d, want %d", del.VolumeId, v.Id)
			}
			deleted[del.ChunkId] = true
		}
	}
	for _, ch := range s0.Chunks {
		if !deleted[ch.ChunkId] {
			t.Errorf("chunk %d was never deleted", ch.ChunkId)
		}
	}
	if len(deleted) != len(s0.Chunks) {
		t.Errorf("%d distinct chunks deleted, want the segment's %d", len(deleted), len(s0.Chunks))
	}
}
