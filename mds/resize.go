package mds

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/units"
)

// Resizing volumes: growing is a change of the record; shrinking (allowed
// explicitly) also frees, in the background, the segments beyond the new
// size, and the volume cannot grow again until they are freed (it would
// read their old data).

func (l *leaderState) extendVolume(ctx context.Context, r *mdspb.ExtendVolumeRequest) (*mdspb.ExtendVolumeResponse, error) {
	size, err := l.roundSize(r.NewSize)
	if err != nil {
		return nil, err
	}
	for {
		v, rev, err := l.volumeByName(ctx, r.Name)
		if err != nil {
			return nil, err
		}
		if size == v.Size {
			return &mdspb.ExtendVolumeResponse{Volume: v}, nil
		}
		if size < v.Size {
			if err := l.checkShrink(ctx, v, size, r.AllowShrink); err != nil {
				return nil, err
			}
			v.FreeingSegments = true
		} else if v.FreeingSegments {
			return nil, status.Errorf(codes.Unavailable, "extend volume %q: it was shrunk and the space beyond %s is still being given back; grow it once that is done (seconds)", r.Name, units.FormatBytes(v.Size))
		}
		shrunk := size < v.Size
		v.Size = size
		key := l.st.k.volume(v.Id)
		ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}, putOp(key, v))
		if err != nil {
			return nil, err
		}
		if ok {
			if shrunk {
				l.log.Info("volume shrunk; freeing the segments beyond its size", "volume", r.Name, "size", units.FormatBytes(size))
				l.wake()
			} else {
				l.log.Info("volume extended", "volume", r.Name, "size", units.FormatBytes(size))
			}
			return &mdspb.ExtendVolumeResponse{Volume: v}, nil
		}
	}
}

// checkShrink refuses a shrink that would lose what something still
// reads or writes: without allow (the data beyond goes), while open for
// writing or published, with snapshots (they read the chunks), or of a
// clone that still reads its source. Its errors begin with the operation
// and the volume, the way cairn-ops reports a failed command.
func (l *leaderState) checkShrink(ctx context.Context, v *mdspb.Volume, size uint64, allow bool) error {
	op := fmt.Sprintf("extend volume %q", v.Name)
	switch {
	case !allow:
		return status.Errorf(codes.InvalidArgument, "%s: it is %s: shrinking it to %s loses what lies beyond; allow the shrink to do it (use --allow-shrink)",
			op, units.FormatBytes(v.Size), units.FormatBytes(size))
	case len(v.Snapshots) > 0:
		return status.Errorf(codes.FailedPrecondition, "%s: it has %d snapshot(s), which read its chunks; delete them before shrinking it", op, len(v.Snapshots))
	case v.CloneSource != nil:
		return status.Errorf(codes.FailedPrecondition, "%s: it is a clone that still reads %s@%s; flatten it before shrinking it", op, v.CloneSource.Volume, v.CloneSource.Snapshot)
	case len(v.Publications) > 0:
		return status.Errorf(codes.FailedPrecondition, "%s: it is published to %s; unpublish it before shrinking it", op, publishedTo(v))
	}
	sessions, err := l.liveSessions(ctx, v.Id)
	if err != nil {
		return err
	}
	for _, s := range sessions {
		if s.Writable && s.Epoch >= writerEpoch(v) {
			return status.Errorf(codes.FailedPrecondition, "%s: it is open for writing by %q (session %s); close it before shrinking it", op, s.Client, s.SessionId)
		}
	}
	return nil
}

// freeShrunkSegments frees the segments beyond the size of volumes that
// were shrunk (their chunks, then their records), then lets them grow
// again.
func (l *leaderState) freeShrunkSegments(ctx context.Context) error {
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return err
	}
	for _, v := range vols {
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED || !v.FreeingSegments {
			continue
		}
		segs, err := list[mdspb.Segment](ctx, l.st, l.st.k.volumeSegments(v.Id))
		if err != nil {
			return err
		}
		freed := 0
		for _, seg := range segs {
			if seg.Offset < v.Size {
				continue
			}
			if err := l.freeSegment(ctx, v, seg); err != nil {
				return fmt.Errorf("volume %q: segment at %d: %w", v.Name, seg.Offset, err)
			}
			if _, err := l.st.txn(ctx, nil, clientv3.OpDelete(l.st.k.segment(v.Id, seg.Offset/l.consts.SegmentSize))); err != nil {
				return err
			}
			l.mu.Lock()
			l.mu.segments--
			l.mu.Unlock()
			freed++
		}
		_, _, _, err = l.updateVolume(ctx, v.Name, nil, func(cur *mdspb.Volume) (fenceKind, error) {
			if cur.Id != v.Id || !cur.FreeingSegments || cur.Size != v.Size {
				return noFence, errNoChange // shrunk again: the next pass
			}
			cur.FreeingSegments = false
			return noFence, nil
		})
		if err != nil && status.Code(err) != codes.NotFound {
			return err
		}
		l.log.Info("segments of a shrunk volume freed", "volume", v.Name, "segments", freed)
	}
	return nil
}
