package mds_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdstest"
)

const seg = 8 << 20 // testConstants.SegmentSize

func listVolumes(t *testing.T, c *cluster) *mdspb.ListVolumesResponse {
	t.Helper()
	l, err := c.conn.Volumes().ListVolumes(c.ctx, &mdspb.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestVolumeLifecycle(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	v := c.createVolume("vol0", seg+1)
	if v.Size != 2*seg || v.Owner != "test" || v.ChunkSize != 1<<20 || v.SegmentSize != seg || v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
		t.Fatalf("created %v; want size rounded up to 2 segments", v)
	}
	st, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(st.Volume, v) {
		t.Fatalf("stat %v, want %v", st.Volume, v)
	}
	ext, err := c.conn.Volumes().ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "vol0", NewSize: 3*seg - 5})
	if err != nil {
		t.Fatal(err)
	}
	if ext.Volume.Size != 3*seg {
		t.Fatalf("extended to %d, want %d", ext.Volume.Size, 3*seg)
	}
	_, err = c.conn.Volumes().ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "vol0", NewSize: seg})
	wantCode(t, err, codes.InvalidArgument)
	c.createVolume("vol1", seg)
	_, err = c.conn.Volumes().RenameVolume(c.ctx, &mdspb.RenameVolumeRequest{Name: "vol0", NewName: "vol1"})
	wantCode(t, err, codes.AlreadyExists)
	ren, err := c.conn.Volumes().RenameVolume(c.ctx, &mdspb.RenameVolumeRequest{Name: "vol0", NewName: "renamed"})
	if err != nil {
		t.Fatal(err)
	}
	if ren.Volume.Name != "renamed" || ren.Volume.Id != v.Id {
		t.Fatalf("renamed to %v", ren.Volume)
	}
	_, err = c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol0"})
	wantCode(t, err, codes.NotFound)
	l := listVolumes(t, c)
	if len(l.Volumes) != 2 || l.Volumes[0].Name != "renamed" || l.Volumes[1].Name != "vol1" {
		t.Fatalf("list %v", l.Volumes)
	}
	if _, err := c.conn.Volumes().DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "renamed"}); err != nil {
		t.Fatal(err)
	}
	_, err = c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "renamed"})
	wantCode(t, err, codes.NotFound)
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := len(listVolumes(t, c).Volumes); n != 1 {
			return fmt.Errorf("%d volumes listed", n)
		}
		return nil
	})
}

func TestBadVolumeRequestsChangeNothing(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	c.createVolume("vol0", 2*seg)
	before := listVolumes(t, c)
	vols := c.conn.Volumes()
	for name, call := range map[string]struct {
		code codes.Code
		do   func() error
	}{
		"create empty name": {codes.InvalidArgument, func() error {
			_, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "", Size: seg})
			return err
		}},
		"create slash name": {codes.InvalidArgument, func() error {
			_, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "a/b", Size: seg})
			return err
		}},
		"create zero size": {codes.InvalidArgument, func() error {
			_, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "x", Size: 0})
			return err
		}},
		"create huge size": {codes.InvalidArgument, func() error {
			_, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "x", Size: 1 << 62})
			return err
		}},
		"create existing": {codes.AlreadyExists, func() error {
			_, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "vol0", Size: 2 * seg})
			return err
		}},
		"create unknown pool": {codes.NotFound, func() error {
			_, err := vols.CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "x", Size: seg, Pool: "nope"})
			return err
		}},
		"extend unknown": {codes.NotFound, func() error {
			_, err := vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "nope", NewSize: seg})
			return err
		}},
		"shrink": {codes.InvalidArgument, func() error {
			_, err := vols.ExtendVolume(c.ctx, &mdspb.ExtendVolumeRequest{Name: "vol0", NewSize: 1})
			return err
		}},
		"rename to bad name": {codes.InvalidArgument, func() error {
			_, err := vols.RenameVolume(c.ctx, &mdspb.RenameVolumeRequest{Name: "vol0", NewName: ""})
			return err
		}},
		"rename unknown": {codes.NotFound, func() error {
			_, err := vols.RenameVolume(c.ctx, &mdspb.RenameVolumeRequest{Name: "nope", NewName: "y"})
			return err
		}},
		"delete unknown": {codes.NotFound, func() error { _, err := vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "nope"}); return err }},
		"open unknown": {codes.NotFound, func() error {
			_, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "nope", Writable: true})
			return err
		}},
		"segment past the end": {codes.InvalidArgument, func() error {
			_, err := vols.GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: 2 * seg, Allocate: true})
			return err
		}},
		"segment not written": {codes.NotFound, func() error {
			_, err := vols.GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: 0})
			return err
		}},
		"refresh unknown": {codes.NotFound, func() error {
			_, err := vols.RefreshSession(c.ctx, &mdspb.RefreshSessionRequest{Name: "vol0", SessionId: "nope"})
			return err
		}},
	} {
		err := call.do()
		if status.Code(err) != call.code {
			t.Errorf("%s: %v, want %s", name, err, call.code)
		}
	}
	after := listVolumes(t, c)
	if !proto.Equal(before, after) {
		t.Fatalf("bad requests changed the volumes:\nbefore %v\nafter  %v", before, after)
	}
	segs, err := vols.ListSegments(c.ctx, &mdspb.ListSegmentsRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if len(segs.Segments) != 0 {
		t.Fatalf("bad requests allocated %d segments", len(segs.Segments))
	}
	for _, d := range c.css {
		if n := len(d.EpochCalls()); n != 0 {
			t.Fatalf("bad requests pushed %d epochs", n)
		}
	}
}

func TestConcurrentCreatesOfOneNameMakeOneVolume(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	const n = 12
	var wg sync.WaitGroup
	errs := make([]error, n)
	ids := make([]uint64, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			resp, err := c.conn.Volumes().CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "same", Size: uint64(i+1) * seg})
			errs[i] = err
			if err == nil {
				ids[i] = resp.Volume.Id
			}
		}(i)
	}
	wg.Wait()
	won := 0
	for i, err := range errs {
		switch status.Code(err) {
		case codes.OK:
			won++
		case codes.AlreadyExists:
		default:
			t.Fatalf("create %d: %v", i, err)
		}
	}
	if won != 1 {
		t.Fatalf("%d creates succeeded, want 1", won)
	}
	l := listVolumes(t, c)
	if len(l.Volumes) != 1 || l.Volumes[0].Name != "same" {
		t.Fatalf("volumes %v, want one named same", l.Volumes)
	}
}

func TestSegmentAllocationIsLazyAndRoundRobin(t *testing.T) {
	c := newCluster(t, 3, 2, nil)
	pool := c.createPool(4) // 8 copysets
	c.createVolume("vol0", 4*seg)
	_, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: seg + 7})
	wantCode(t, err, codes.NotFound)

	// Concurrent first writes to one segment get the same segment.
	var wg sync.WaitGroup
	got := make([]*mdspb.Segment, 6)
	for i := range got {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			resp, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: seg + uint64(i)*4096, Allocate: true})
			if err != nil {
				t.Error(err)
				return
			}
			got[i] = resp.Segment
		}(i)
	}
	wg.Wait()
	for i := range got {
		if !proto.Equal(got[i], got[0]) {
			t.Fatalf("concurrent allocations differ:\n%v\n%v", got[0], got[i])
		}
	}
	s1 := got[0]
	if s1.Offset != seg || len(s1.Chunks) != 8 {
		t.Fatalf("segment %v: want offset %d and 8 chunks", s1, seg)
	}
	s0 := c.allocate("vol0", 0)
	s3 := c.allocate("vol0", 3*seg+100)
	// Chunk ids are unique; chunks go round-robin over every copyset.
	seen := map[uint64]bool{}
	perCopyset := map[uint32]int{}
	for _, s := range []*mdspb.Segment{s0, s1, s3} {
		for i, ch := range s.Chunks {
			if seen[ch.ChunkId] {
				t.Fatalf("chunk id %d handed out twice", ch.ChunkId)
			}
			seen[ch.ChunkId] = true
			perCopyset[ch.Copyset.CopysetId]++
			if ch.Copyset.LogicalPoolId != pool.Id {
				t.Fatalf("chunk in pool %d", ch.Copyset.LogicalPoolId)
			}
			if i > 0 && ch.Copyset.CopysetId == s.Chunks[i-1].Copyset.CopysetId {
				t.Fatalf("consecutive chunks on copyset %d", ch.Copyset.CopysetId)
			}
		}
	}
	if len(perCopyset) != int(pool.CopysetCount) {
		t.Fatalf("24 chunks used %d of %d copysets", len(perCopyset), pool.CopysetCount)
	}
	for cs, n := range perCopyset {
		if n != 3 {
			t.Fatalf("copyset %d holds %d of 24 chunks, want 3", cs, n)
		}
	}
	list, err := c.conn.Volumes().ListSegments(c.ctx, &mdspb.ListSegmentsRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Segments) != 3 {
		t.Fatalf("%d segments listed, want 3", len(list.Segments))
	}
	st, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if st.Volume.AllocatedSegments != 3 {
		t.Fatalf("stat says %d segments allocated", st.Volume.AllocatedSegments)
	}
	// Reading an allocated segment without allocate returns it.
	again, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: 3 * seg})
	if err != nil || !proto.Equal(again.Segment, s3) {
		t.Fatalf("get allocated segment: %v %v", again, err)
	}
}

func TestAllocationAvoidsCopysetsWithOfflineMembers(t *testing.T) {
	c := newCluster(t, 3, 2, func(cfg *mds.Config) {
		cfg.UnstableTimeout = 500 * time.Millisecond
		cfg.OfflineTimeout = 1500 * time.Millisecond
	})
	c.createPool(3)
	dead := c.css[0]
	dead.Stop()
	c.heartbeatLoop(func(d *mdstest.ChunkServerDouble) bool { return d == dead })
	soon.Succeeds(t, 10*time.Second, func() error {
		got, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: dead.ID()})
		if err != nil {
			return err
		}
		if got.Chunkserver.OnlineState != mdspb.OnlineState_ONLINE_STATE_OFFLINE {
			return fmt.Errorf("chunkserver %d is %s", dead.ID(), got.Chunkserver.OnlineState)
		}
		return nil
	})
	cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	withDead := map[uint32]bool{}
	for _, x := range cs.Copysets {
		for _, p := range x.Peers {
			if p.ChunkserverId == dead.ID() {
				withDead[x.Id.CopysetId] = true
			}
		}
	}
	if len(withDead) == 0 || len(withDead) == len(cs.Copysets) {
		t.Fatalf("%d of %d copysets include the dead chunkserver", len(withDead), len(cs.Copysets))
	}
	c.createVolume("vol0", 2*seg)
	for _, off := range []uint64{0, seg} {
		for _, ch := range c.allocate("vol0", off).Chunks {
			if withDead[ch.Copyset.CopysetId] {
				t.Fatalf("chunk %d placed on copyset %d with offline chunkserver %d", ch.ChunkId, ch.Copyset.CopysetId, dead.ID())
			}
		}
	}
}

func TestAllocationRefusedWithoutSpace(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	c.createVolume("vol0", 2*seg)
	// Room for exactly one segment: 8 chunks x 3 replicas = 24 chunk files.
	for _, d := range c.css {
		d.SetCapacity(&mdspb.Capacity{PoolFreeChunks: 8, PoolTargetChunks: 8, FormatPercent: 100})
	}
	c.heartbeatAll()
	c.allocate("vol0", 0)
	for _, d := range c.css {
		d.SetCapacity(&mdspb.Capacity{PoolFreeChunks: 7, PoolUsedChunks: 1, PoolTargetChunks: 8, FormatPercent: 100})
	}
	c.heartbeatAll()
	_, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: seg, Allocate: true})
	wantCode(t, err, codes.ResourceExhausted)
	segs, err := c.conn.Volumes().ListSegments(c.ctx, &mdspb.ListSegmentsRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if len(segs.Segments) != 1 {
		t.Fatalf("%d segments after the refusal, want 1", len(segs.Segments))
	}
}
