package chunkserver_test

import (
	"fmt"
	"slices"
	"testing"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/test/cluster"
)

// TestChunksExist: the leader of each copyset tells which of its chunks
// exist (written, not deleted since), now and at a snapshot's sequence
// number; followers redirect; malformed lists are refused.
func TestChunksExist(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	v := openVolume(t, c, "exists")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	for _, i := range []int{0, 5, 17} {
		ch := v.chunks[i]
		if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 4096, make([]byte, 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write chunk %d: %v %v", i, st, err)
		}
	}
	// Chunk 30 is created under sequence number 3: a snapshot at 2 did not
	// have it.
	ch30 := v.chunks[30]
	if st, err := cc.Do(ctx, ch30.GetCopyset(), func(cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error) {
		r, err := cl.WriteChunk(ctx, &chunkpb.WriteChunkRequest{Copyset: ch30.GetCopyset(), ChunkId: ch30.GetChunkId(), VolumeId: v.id, Epoch: v.epoch,
			Data: make([]byte, 4096), Sn: 3})
		return r.GetStatus(), r.GetLeader(), err
	}); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("write chunk 30 under sequence number 3: %v %v", st, err)
	}
	ch5 := v.chunks[5]
	if st, err := cc.Do(ctx, ch5.GetCopyset(), func(cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error) {
		r, err := cl.DeleteChunk(ctx, &chunkpb.DeleteChunkRequest{Copyset: ch5.GetCopyset(), ChunkId: ch5.GetChunkId(), VolumeId: v.id, Epoch: v.epoch})
		return r.GetStatus(), r.GetLeader(), err
	}); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("delete chunk 5: %v %v", st, err)
	}

	// The segment's chunks by copyset, asked of each leader in one call.
	type group struct {
		ref *commonpb.CopysetRef
		ids []uint64
		idx []int
	}
	groups := map[string]*group{}
	for i, ch := range v.chunks {
		k := ch.GetCopyset().Name()
		if groups[k] == nil {
			groups[k] = &group{ref: ch.GetCopyset()}
		}
		groups[k].ids = append(groups[k].ids, ch.GetChunkId())
		groups[k].idx = append(groups[k].idx, i)
	}
	existing := func(snap uint64) []int {
		var out []int
		for _, g := range groups {
			var exists []bool
			st, err := cc.Do(ctx, g.ref, func(cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error) {
				r, err := cl.ChunksExist(ctx, &chunkpb.ChunksExistRequest{Copyset: g.ref, ChunkIds: g.ids, VolumeId: v.id, Epoch: v.epoch, SnapshotSn: snap})
				exists = r.GetExists()
				return r.GetStatus(), r.GetLeader(), err
			})
			if err != nil || st != chunkpb.Status_STATUS_OK || len(exists) != len(g.ids) {
				t.Fatalf("chunks exist in copyset %s: %v %v, %d answers for %d chunks", g.ref.Name(), st, err, len(exists), len(g.ids))
			}
			for k, e := range exists {
				if e {
					out = append(out, g.idx[k])
				}
			}
		}
		slices.Sort(out)
		return out
	}
	if got := existing(0); fmt.Sprint(got) != "[0 17 30]" {
		t.Fatalf("chunks that exist: %v, want [0 17 30]", got)
	}
	if got := existing(2); fmt.Sprint(got) != "[0 17]" {
		t.Fatalf("chunks that existed at sequence number 2: %v, want [0 17]", got)
	}
	if got := existing(3); fmt.Sprint(got) != "[0 17 30]" {
		t.Fatalf("chunks that existed at sequence number 3: %v, want [0 17 30]", got)
	}

	ref := v.chunks[0].GetCopyset()
	leader, err := cc.Leader(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range c.ChunkServers() {
		if s.Addr() == leader {
			continue
		}
		r, err := cc.Client(s.Addr()).ChunksExist(ctx, &chunkpb.ChunksExistRequest{Copyset: ref, ChunkIds: []uint64{v.chunks[0].GetChunkId()}, VolumeId: v.id})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetStatus() != chunkpb.Status_STATUS_REDIRECTED || r.GetLeader().GetAddress() != leader || len(r.GetExists()) != 0 {
			t.Fatalf("asked a follower: %v %v %v", r.GetStatus(), r.GetLeader(), r.GetExists())
		}
	}
	for _, ids := range [][]uint64{nil, {v.chunks[0].GetChunkId(), 0}, make([]uint64, chunkpb.MaxChunksExist+1)} {
		for i := range ids {
			if i == 0 || len(ids) > 2 {
				ids[i] = v.chunks[0].GetChunkId()
			}
		}
		r, err := cc.Client(leader).ChunksExist(ctx, &chunkpb.ChunksExistRequest{Copyset: ref, ChunkIds: ids, VolumeId: v.id})
		if err != nil || r.GetStatus() != chunkpb.Status_STATUS_INVALID_REQUEST {
			t.Fatalf("%d chunk ids: %v %v", len(ids), r.GetStatus(), err)
		}
	}
}
