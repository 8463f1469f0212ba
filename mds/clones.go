package mds

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/geometry"
)

// Clones. A clone is a volume created from a READY snapshot of another
// volume, instantly: it records the snapshot (Volume.clone_source), and
// the snapshot records the clone (Snapshot.clones), both in one etcd
// transaction. Clients read the source snapshot wherever the clone's
// chunks do not own a page, and write with the source's content for pages
// they cover in part (the chunkserver's clone chunks). Flatten, driven by
// a client that copies every page the source holds into the clone, ends
// with FlattenVolume; a session lease later, when every handle of the clone
// has heard of it, the source is released (releaseFlattenedClones): the
// clone forgets it and the snapshot may be deleted. While a clone reads a
// snapshot, the snapshot cannot be deleted, nor the source volume, nor
// renamed (the clone names it).

// cloneFeature is what a client lists in OpenVolumeRequest.features to say
// it reads clones.
const cloneFeature = "clones"

func (l *leaderState) createClone(ctx context.Context, r *mdspb.CreateVolumeRequest) (*mdspb.CreateVolumeResponse, error) {
	if err := checkNewName("volume name", r.Name); err != nil {
		return nil, err
	}
	if r.SourceSnapshot == "" {
		return nil, status.Errorf(codes.InvalidArgument, "a clone of volume %q names no snapshot", r.SourceVolume)
	}
	nameKey := l.st.k.volumeName(r.Name)
	for {
		src, rev, err := l.volumeByName(ctx, r.SourceVolume)
		if err != nil {
			return nil, err
		}
		i := slices.IndexFunc(src.Snapshots, func(s *mdspb.Snapshot) bool {
			return s.Name == r.SourceSnapshot && s.Status != mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING
		})
		if i < 0 {
			return nil, status.Errorf(codes.NotFound, "volume %q has no snapshot %q", r.SourceVolume, r.SourceSnapshot)
		}
		snap := src.Snapshots[i]
		if snap.Status != mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY {
			return nil, status.Errorf(codes.FailedPrecondition, "snapshot %s@%s is %s, not ready", r.SourceVolume, r.SourceSnapshot, snap.Status.Label())
		}
		size := snap.Size
		if r.Size != 0 {
			if size, err = l.roundSize(r.Size); err != nil {
				return nil, err
			}
			if size < snap.Size {
				return nil, status.Errorf(codes.InvalidArgument, "a clone of %s@%s is at least the snapshot's %d bytes, not %d", r.SourceVolume, r.SourceSnapshot, snap.Size, size)
			}
		}
		poolID := src.LogicalPoolId
		if r.Pool != "" {
			pool, err := l.choosePool(r.Pool)
			if err != nil {
				return nil, err
			}
			poolID = pool.Id
		}
		if err := l.checkPoolFeature(poolID, "clones", true); err != nil {
			return nil, err
		}
		if idStr, found, err := l.st.getRaw(ctx, nameKey); err != nil {
			return nil, err
		} else if found {
			// A retry of the call that made it answers with it.
			if id, _ := strconv.ParseUint(idStr, 10, 64); slices.Contains(snap.Clones, id) {
				if v, _, err := l.volumeByName(ctx, r.Name); err == nil && v.GetCloneSource().GetSeq() == snap.Seq {
					return &mdspb.CreateVolumeResponse{Volume: v}, nil
				}
			}
			return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists", r.Name)
		}
		id, err := l.st.reserveIDs(ctx, counterVolume, 1)
		if err != nil {
			return nil, err
		}
		v := &mdspb.Volume{
			Id: id, Name: r.Name, Size: size, Owner: r.Owner, LogicalPoolId: poolID,
			ChunkSize: l.consts.ChunkSize, SegmentSize: l.consts.SegmentSize,
			Status: mdspb.VolumeStatus_VOLUME_STATUS_CREATED, CreatedUnix: time.Now().Unix(),
			CloneSource: &mdspb.CloneSource{VolumeId: src.Id, Volume: src.Name, Snapshot: snap.Name, Seq: snap.Seq, Size: snap.Size},
		}
		snap.Clones = append(snap.Clones, id)
		srcKey := l.st.k.volume(src.Id)
		ok, err := l.st.txn(ctx, []clientv3.Cmp{
			clientv3.Compare(clientv3.CreateRevision(nameKey), "=", 0),
			clientv3.Compare(clientv3.ModRevision(srcKey), "=", rev),
		}, clientv3.OpPut(nameKey, strconv.FormatUint(id, 10)), putOp(l.st.k.volume(id), v), putOp(srcKey, src))
		if err != nil {
			return nil, err
		}
		if ok {
			l.log.Info("clone created", "volume", r.Name, "id", id, "size", size, "source", r.SourceVolume+"@"+r.SourceSnapshot)
			return &mdspb.CreateVolumeResponse{Volume: v}, nil
		}
		// The source changed (or the name was taken): look again.
	}
}

// checkPoolFeature refuses a clone (or a snapshot: what) in a logical pool
// where a chunkserver holding one of its copysets has not said, in a
// heartbeat to this leader, that it understands clone chunks and sequence
// numbers ("clones"): one that predates clones would apply a clone's
// writes as plain ones (or skip them), and one that predates snapshots
// writes without keeping what they read.
// Unless strict, a chunkserver not heard from since this leader took over
// (down, or not reported yet) is let pass: snapshots do not wait for
// every chunkserver of a pool after a failover or while one is down.
func (l *leaderState) checkPoolFeature(pool uint32, what string, strict bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[uint64]bool{}
	for _, cs := range l.mu.copysets {
		if cs.GetId().GetLogicalPoolId() != pool {
			continue
		}
		for _, p := range append(slices.Clone(cs.Peers), cs.Learners...) {
			id := p.ChunkserverId
			if seen[id] {
				continue
			}
			seen[id] = true
			e := l.mu.chunkServers[id]
			switch {
			case e == nil:
			case e.lastHB.IsZero() && !strict:
			case e.lastHB.IsZero():
				return status.Errorf(codes.Unavailable, "chunkserver %d (%s) has not reported to this MDS yet; %s need every chunkserver of the pool running a version that knows them (try again shortly)", id, e.rec.GetAddress(), what)
			case !slices.Contains(e.features, cloneFeature):
				return status.Errorf(codes.FailedPrecondition, "chunkserver %d (%s) runs a version that does not know %s; upgrade every chunkserver of the pool first", id, e.rec.GetAddress(), what)
			}
		}
	}
	return nil
}

// liveClones returns the clones that still read a snapshot: the ids it
// lists whose volume exists (or is in the trash, whence it may come back)
// and names it as its source (an id left by a clone deleted or released
// halfway is not one).
func (l *leaderState) liveClones(ctx context.Context, src *mdspb.Volume, snap *mdspb.Snapshot) ([]*mdspb.Volume, error) {
	var out []*mdspb.Volume
	for _, id := range snap.Clones {
		v := &mdspb.Volume{}
		found, _, err := l.st.get(ctx, l.st.k.volume(id), v)
		if err != nil {
			return nil, err
		}
		cs := v.GetCloneSource()
		live := v.Status == mdspb.VolumeStatus_VOLUME_STATUS_CREATED || v.Status == mdspb.VolumeStatus_VOLUME_STATUS_TRASHED // restorable
		if found && live && cs.GetVolumeId() == src.Id && cs.GetSeq() == snap.Seq {
			out = append(out, v)
		}
	}
	return out, nil
}

// describeClones names clones for an error: "vol1, vol2 (flattened; released
// within 40s)".
func (l *leaderState) describeClones(clones []*mdspb.Volume) string {
	var names []string
	for _, c := range clones {
		name := c.Name
		if f := c.GetCloneSource().GetFlattenedUnix(); f != 0 {
			left := time.Until(time.Unix(f, 0).Add(l.s.cfg.SessionLease + time.Second)).Round(time.Second)
			name += fmt.Sprintf(" (flattened; released within %v)", max(left, time.Second))
		}
		names = append(names, name)
	}
	return strings.Join(names, ", ")
}

// refuseIfCloned refuses to delete a snapshot (or, with snap nil, any
// snapshot of src) that clones still read.
func (l *leaderState) refuseIfCloned(ctx context.Context, src *mdspb.Volume, snap *mdspb.Snapshot, what string) error {
	for _, s := range src.Snapshots {
		if snap != nil && s != snap {
			continue
		}
		clones, err := l.liveClones(ctx, src, s)
		if err != nil {
			return err
		}
		if len(clones) > 0 {
			return status.Errorf(codes.FailedPrecondition, "%s: snapshot %s@%s has clones that read from it: %s; flatten them first (cairn-ops flatten VOLUME) or delete them",
				what, src.Name, s.Name, l.describeClones(clones))
		}
	}
	return nil
}

// flattenVolume records that a clone's flatten copied every page its
// source holds into it.
func (l *leaderState) flattenVolume(ctx context.Context, r *mdspb.FlattenVolumeRequest) (*mdspb.FlattenVolumeResponse, error) {
	v, _, _, err := l.updateVolume(ctx, r.Name, nil, func(v *mdspb.Volume) (fenceKind, error) {
		cs := v.GetCloneSource()
		switch {
		case cs == nil:
			return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is not a clone (or was flattened and released)", r.Name)
		case cs.FlattenedUnix != 0:
			return noFence, errNoChange
		}
		cs.FlattenedUnix = time.Now().Unix()
		cs.FlattenedSeq = max(v.Seq, 1)
		return noFence, nil
	})
	if err != nil {
		return nil, err
	}
	l.log.Info("clone flattened", "volume", r.Name, "source", v.GetCloneSource().GetVolume()+"@"+v.GetCloneSource().GetSnapshot())
	l.wake()
	return &mdspb.FlattenVolumeResponse{Volume: v}, nil
}

// releaseFlattenedClones forgets the sources of clones flattened a session
// lease ago, once no snapshot of the clone from before the flatten
// remains: first the volume's epoch is raised (leaving its writer in
// place) and every chunkserver made to hold it, so that the fills of a
// flatten still running elsewhere are refused from then on (they would
// bring the source's data back into chunks unmapped after the release);
// then the clone forgets its source; then the snapshot's list forgets the
// clone (an id left there by a failure between the two is ignored by
// liveClones).
func (l *leaderState) releaseFlattenedClones(ctx context.Context) error {
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return err
	}
	settled := time.Now().Add(-l.s.cfg.SessionLease - time.Second).Unix()
	releasable := func(v *mdspb.Volume, id uint64) bool {
		cs := v.GetCloneSource()
		return v.Id == id && v.Status == mdspb.VolumeStatus_VOLUME_STATUS_CREATED && cs != nil && cs.FlattenedUnix != 0 &&
			cs.FlattenedUnix <= settled && !snapshotBefore(v, cs.FlattenedSeq)
	}
	var errs []error
	for _, v := range vols {
		if !releasable(v, v.Id) {
			continue
		}
		cs := v.GetCloneSource()
		// Raise the epoch once; a pass after a failed fence waits again.
		cur, version, bumped, err := l.updateVolume(ctx, v.Name, nil, func(cur *mdspb.Volume) (fenceKind, error) {
			if !releasable(cur, v.Id) {
				return noFence, errGone
			}
			if cur.CloneSource.Releasing {
				return noFence, errNoChange
			}
			cur.CloneSource.Releasing = true
			return newSequence, nil
		})
		switch {
		case errors.Is(err, errGone) || status.Code(err) == codes.NotFound:
			continue // renamed, deleted, or released meanwhile
		case err != nil:
			errs = append(errs, fmt.Errorf("release the source of clone %q: %w", v.Name, err))
			continue
		}
		if version != 0 {
			err = l.fenceEpoch(ctx, cur, version, bumped)
		} else {
			err = l.fenceAgain(ctx, cur)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("release the source of clone %q: not every chunkserver holds its new epoch yet: %w", v.Name, err))
			continue
		}
		cleared := false
		_, _, _, err = l.updateVolume(ctx, v.Name, nil, func(cur *mdspb.Volume) (fenceKind, error) {
			cleared = false
			if !releasable(cur, v.Id) || !cur.CloneSource.Releasing {
				return noFence, errNoChange
			}
			cur.CloneSource = nil
			cleared = true
			return noFence, nil
		})
		switch {
		case status.Code(err) == codes.NotFound:
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("release the source of clone %q: %w", v.Name, err))
			continue
		case !cleared:
			continue
		}
		if err := l.forgetClone(ctx, cs, v.Id); err != nil {
			errs = append(errs, err)
			continue
		}
		l.log.Info("clone released from its source", "volume", v.Name, "source", cs.Volume+"@"+cs.Snapshot)
	}
	return errors.Join(errs...)
}

// errGone ends an updateVolume whose volume is no longer the one meant.
var errGone = errors.New("volume changed")

// snapshotBefore reports a snapshot of v (in any state: a deleted one is
// trimmed before its record goes) taken before sequence number seq.
func snapshotBefore(v *mdspb.Volume, seq uint64) bool {
	return slices.ContainsFunc(v.Snapshots, func(s *mdspb.Snapshot) bool { return s.Seq < seq })
}

// cloneSnapshotsFit reports whether a chunk's version can keep, beside the
// pages it holds, which pages a clone's chunk did not own (the
// datastore's version slot: a 64-byte header, two bitmaps of a bit per
// copy unit, a CRC, in half a meta page). Larger chunks cannot snapshot a
// clone before it is flattened.
func cloneSnapshotsFit(c *mdspb.ClusterConstants) bool {
	unit := geometry.CopyUnit(int64(c.GetChunkSize()), int64(c.GetMetaPageSize()), int64(c.GetBlockSize()))
	bitmap := ((int64(c.GetChunkSize())+unit-1)/unit + 7) / 8
	return 64+2*bitmap+4 <= int64(c.GetMetaPageSize())/2
}

// forgetClone drops a clone's id from its source snapshot's list.
func (l *leaderState) forgetClone(ctx context.Context, cs *mdspb.CloneSource, id uint64) error {
	src := &mdspb.Volume{}
	found, _, err := l.st.get(ctx, l.st.k.volume(cs.VolumeId), src)
	if err != nil || !found || src.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
		return err
	}
	_, _, _, err = l.updateVolume(ctx, src.Name, nil, func(cur *mdspb.Volume) (fenceKind, error) {
		changed := false
		for _, s := range cur.Snapshots {
			if s.Seq == cs.Seq && slices.Contains(s.Clones, id) {
				s.Clones = slices.DeleteFunc(s.Clones, func(x uint64) bool { return x == id })
				changed = true
			}
		}
		if cur.Id != cs.VolumeId || !changed {
			return noFence, errNoChange
		}
		return noFence, nil
	})
	if err != nil {
		return fmt.Errorf("forget clone %d in %s@%s: %w", id, cs.Volume, cs.Snapshot, err)
	}
	return nil
}

// checkCloneOpen refuses a clone that still reads its source to a client
// that does not read clones.
func checkCloneOpen(v *mdspb.Volume, features []string) error {
	if cs := v.GetCloneSource(); cs != nil && !slices.Contains(features, cloneFeature) {
		return status.Errorf(codes.FailedPrecondition, "volume %q is a clone of %s@%s that is not released from it; this client does not read clones (upgrade it)",
			v.Name, cs.Volume, cs.Snapshot)
	}
	return nil
}
