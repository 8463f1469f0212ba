package mds

import (
	"context"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
)

// getSegment returns the segment holding an offset, allocating it when asked
// and missing. Concurrent allocations of one segment all receive the same
// segment.
func (l *leaderState) getSegment(ctx context.Context, r *mdspb.GetSegmentRequest) (*mdspb.GetSegmentResponse, error) {
	v, _, err := l.volumeByName(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	if r.Offset >= v.Size {
		return nil, status.Errorf(codes.InvalidArgument, "offset %d is beyond the end of volume %q (%d bytes)", r.Offset, r.Name, v.Size)
	}
	index := r.Offset / l.consts.SegmentSize
	key := l.st.k.segment(v.Id, index)
	seg := &mdspb.Segment{}
	found, _, err := l.st.get(ctx, key, seg)
	if err != nil {
		return nil, err
	}
	if found {
		return &mdspb.GetSegmentResponse{Segment: seg}, nil
	}
	if !r.Allocate {
		return nil, status.Errorf(codes.NotFound, "segment at offset %d of volume %q is not allocated", index*l.consts.SegmentSize, r.Name)
	}
	unlock := l.volLocks.lock(v.Id)
	defer unlock()
	// Another call may have allocated it while this one waited.
	if found, _, err := l.st.get(ctx, key, seg); err != nil {
		return nil, err
	} else if found {
		return &mdspb.GetSegmentResponse{Segment: seg}, nil
	}
	// The segment is written only if the volume did not change meanwhile
	// (a delete must not race with an allocation); retry when it did.
	for attempt := 0; ; attempt++ {
		v, volRev, err := l.volumeByName(ctx, r.Name)
		if err != nil {
			return nil, err
		}
		seg, err = l.placeSegment(ctx, v, index)
		if err != nil {
			return nil, err
		}
		volKey := l.st.k.volume(v.Id)
		ok, err := l.st.txn(ctx, []clientv3.Cmp{
			clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.ModRevision(volKey), "=", volRev),
		}, putOp(key, seg))
		if err != nil {
			return nil, err
		}
		if ok {
			break
		}
		if found, _, err := l.st.get(ctx, key, seg); err != nil {
			return nil, err
		} else if found {
			return &mdspb.GetSegmentResponse{Segment: seg}, nil
		}
		if attempt == 4 {
			return nil, status.Errorf(codes.Aborted, "volume %q kept changing during allocation; retry", r.Name)
		}
	}
	l.mu.Lock()
	l.mu.segments++
	l.mu.Unlock()
	l.s.metrics.segmentsAllocated.Inc()
	return &mdspb.GetSegmentResponse{Segment: seg}, nil
}

// placeSegment picks chunk ids and copysets for a new segment: chunks go
// round-robin over the pool's allocatable copysets.
func (l *leaderState) placeSegment(ctx context.Context, v *mdspb.Volume, index uint64) (*mdspb.Segment, error) {
	n := l.consts.SegmentSize / l.consts.ChunkSize
	now := time.Now()
	l.mu.Lock()
	pool := l.mu.logicalPools[v.LogicalPoolId]
	if pool == nil || pool.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
		l.mu.Unlock()
		return nil, status.Errorf(codes.FailedPrecondition, "logical pool %d of volume %q is not ready", v.LogicalPoolId, v.Name)
	}
	var healthy []*mdspb.Copyset
	for _, c := range l.poolCopysetsLocked(pool.Id) {
		if l.copysetHealthLocked(c, now).allocatable {
			healthy = append(healthy, c)
		}
	}
	if len(healthy) == 0 {
		l.mu.Unlock()
		return nil, status.Errorf(codes.Unavailable, "logical pool %q has no healthy copyset (all have a member offline)", pool.Name)
	}
	// New chunks go to copysets whose members all have room.
	roomy, full := l.withRoomLocked(healthy)
	if len(roomy) == 0 {
		l.mu.Unlock()
		return nil, status.Errorf(codes.ResourceExhausted, "logical pool %q has no copyset whose chunkservers all have room: chunkservers %v are past %.0f%% full",
			pool.Name, full, 100*l.s.cfg.Schedule.SpaceFull)
	}
	healthy = roomy
	free, reported := l.poolFreeChunksLocked(pool.PhysicalPoolId, now)
	need := n * uint64(pool.Replicas)
	if reported && free < need {
		l.mu.Unlock()
		return nil, status.Errorf(codes.ResourceExhausted, "logical pool %q has no space: a segment needs %d chunk files (%d chunks x %d replicas), the chunkservers report %d free",
			pool.Name, need, n, pool.Replicas, free)
	}
	start := l.mu.rr[pool.Id]
	l.mu.rr[pool.Id] = (start + int(n)) % len(healthy)
	refs := make([]*mdspb.ChunkRef, n)
	for i := range refs {
		refs[i] = &mdspb.ChunkRef{Copyset: proto.CloneOf(healthy[(start+i)%len(healthy)].Id)}
	}
	l.mu.Unlock()
	first, err := l.chunkIDs.take(ctx, n)
	if err != nil {
		return nil, err
	}
	for i, ref := range refs {
		ref.ChunkId = first + uint64(i)
	}
	return &mdspb.Segment{VolumeId: v.Id, Offset: index * l.consts.SegmentSize, Chunks: refs}, nil
}

// withRoomLocked keeps the copysets none of whose members is past the
// space-full threshold, and names the chunkservers that are. l.mu held.
func (l *leaderState) withRoomLocked(copysets []*mdspb.Copyset) (roomy []*mdspb.Copyset, full []uint64) {
	isFull := map[uint64]bool{}
	for id, e := range l.mu.chunkServers {
		if e.capacity.UsedFraction() >= l.s.cfg.Schedule.SpaceFull {
			isFull[id] = true
		}
	}
	for _, c := range copysets {
		if !slices.ContainsFunc(c.Peers, func(p *commonpb.Peer) bool { return isFull[p.ChunkserverId] }) {
			roomy = append(roomy, c)
		}
	}
	for id := range isFull {
		full = append(full, id)
	}
	slices.Sort(full)
	return roomy, full
}

// poolFreeChunksLocked sums the chunk files new data can still take
// (formatted and free, or still to be created) on the chunkservers of a
// physical pool that are not OFFLINE. reported is false while none has
// reported a capacity.
func (l *leaderState) poolFreeChunksLocked(physPool uint32, now time.Time) (free uint64, reported bool) {
	for _, e := range l.mu.chunkServers {
		if e.physPool != physPool || e.capacity == nil {
			continue
		}
		if l.onlineStateLocked(e, now) == mdspb.OnlineState_ONLINE_STATE_OFFLINE {
			continue
		}
		reported = true
		free += e.capacity.AvailableChunks()
	}
	return free, reported
}

func (l *leaderState) listSegments(ctx context.Context, r *mdspb.ListSegmentsRequest) (*mdspb.ListSegmentsResponse, error) {
	v, _, err := l.volumeByName(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	segs, err := list[mdspb.Segment](ctx, l.st, l.st.k.volumeSegments(v.Id))
	if err != nil {
		return nil, err
	}
	return &mdspb.ListSegmentsResponse{Segments: segs}, nil
}
