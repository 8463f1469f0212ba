package mds

import (
	"context"
	"fmt"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
)

// The trash. TrashVolume frees a volume's name and keeps its record and
// chunks (TRASHED) until it expires, is purged (DeleteVolume by id) or is
// restored under its name or another. A trashed volume opens for nobody;
// its snapshots stay with it.

// defaultTrashTime is how long a volume stays in the trash unless asked.
const defaultTrashTime = 7 * 24 * time.Hour

// maxTrashTime bounds how long a volume may be kept in the trash.
const maxTrashTime = 365 * 24 * time.Hour

func (l *leaderState) trashVolume(ctx context.Context, r *mdspb.TrashVolumeRequest) (*mdspb.TrashVolumeResponse, error) {
	keep := time.Duration(r.ExpireSeconds) * time.Second
	if keep == 0 {
		keep = defaultTrashTime
	}
	if keep > maxTrashTime {
		return nil, status.Errorf(codes.InvalidArgument, "a volume stays in the trash at most %v, not %v", maxTrashTime, keep)
	}
	for {
		v, rev, err := l.volumeByName(ctx, r.Name)
		if err != nil {
			return nil, err
		}
		if err := l.checkRemovable(ctx, v, r.Force, fmt.Sprintf("move volume %q to the trash", r.Name)); err != nil {
			return nil, err
		}
		now := time.Now()
		key := l.st.k.volume(v.Id)
		v.Status = mdspb.VolumeStatus_VOLUME_STATUS_TRASHED
		v.TrashedUnix, v.TrashExpiresUnix = now.Unix(), now.Add(keep).Unix()
		ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)},
			putOp(key, v), clientv3.OpDelete(l.st.k.volumeName(r.Name)))
		if err != nil {
			return nil, err
		}
		if ok {
			l.log.Info("volume moved to the trash", "volume", r.Name, "id", v.Id, "expires", time.Unix(v.TrashExpiresUnix, 0).UTC())
			return &mdspb.TrashVolumeResponse{Volume: v}, nil
		}
	}
}

// trashed reads the trashed volume with id.
func (l *leaderState) trashed(ctx context.Context, id uint64) (*mdspb.Volume, int64, error) {
	v := &mdspb.Volume{}
	found, rev, err := l.st.get(ctx, l.st.k.volume(id), v)
	if err != nil {
		return nil, 0, err
	}
	if !found || v.Status != mdspb.VolumeStatus_VOLUME_STATUS_TRASHED {
		return nil, 0, status.Errorf(codes.NotFound, "no volume with id %d is in the trash", id)
	}
	return v, rev, nil
}

func (l *leaderState) restoreVolume(ctx context.Context, r *mdspb.RestoreVolumeRequest) (*mdspb.RestoreVolumeResponse, error) {
	for {
		v, rev, err := l.trashed(ctx, r.Id)
		if err != nil {
			return nil, err
		}
		name := v.Name
		if r.NewName != "" {
			if err := checkNewName("volume name", r.NewName); err != nil {
				return nil, err
			}
			name = r.NewName
		}
		key, nameKey := l.st.k.volume(v.Id), l.st.k.volumeName(name)
		v.Name, v.Status, v.TrashedUnix, v.TrashExpiresUnix = name, mdspb.VolumeStatus_VOLUME_STATUS_CREATED, 0, 0
		ok, err := l.st.txn(ctx, []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(key), "=", rev),
			clientv3.Compare(clientv3.CreateRevision(nameKey), "=", 0),
		}, putOp(key, v), clientv3.OpPut(nameKey, strconv.FormatUint(v.Id, 10)))
		if err != nil {
			return nil, err
		}
		if ok {
			l.log.Info("volume restored from the trash", "volume", name, "id", v.Id)
			return &mdspb.RestoreVolumeResponse{Volume: v}, nil
		}
		if _, found, err := l.st.getRaw(ctx, nameKey); err != nil {
			return nil, err
		} else if found {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists; restore volume %d under another name", name, r.Id)
		}
	}
}

// purgeTrashed deletes a trashed volume now (its chunks are freed in the
// background).
func (l *leaderState) purgeTrashed(ctx context.Context, id uint64) error {
	for {
		v, rev, err := l.trashed(ctx, id)
		if err != nil {
			return err
		}
		key := l.st.k.volume(v.Id)
		v.Status = mdspb.VolumeStatus_VOLUME_STATUS_DELETING
		ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}, putOp(key, v))
		if err != nil {
			return err
		}
		if ok {
			l.log.Info("volume deleting from the trash", "volume", v.Name, "id", v.Id)
			l.forgetDeleted(ctx, v)
			l.wake()
			return nil
		}
	}
}

// expireTrash deletes the trashed volumes whose time is up.
func (l *leaderState) expireTrash(ctx context.Context) error {
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return err
	}
	now := time.Now().Unix()
	for _, v := range vols {
		if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_TRASHED && v.TrashExpiresUnix <= now {
			if err := l.purgeTrashed(ctx, v.Id); err != nil && status.Code(err) != codes.NotFound {
				return fmt.Errorf("volume %d: %w", v.Id, err)
			}
		}
	}
	return nil
}

// forgetDeleted drops a deleted clone from its source snapshot's list
// (best effort: an id left behind is not a live clone).
func (l *leaderState) forgetDeleted(ctx context.Context, v *mdspb.Volume) {
	if cs := v.GetCloneSource(); cs != nil {
		if err := l.forgetClone(ctx, cs, v.Id); err != nil {
			l.log.Warn("deleted clone stays listed by its source snapshot", "volume", v.Name, "err", err)
		}
	}
}

// useForce tells the operator how to force a refused removal, in the
// terms of the command line (cairn-ops delete volume / trash volume).
const useForce = "(use --force)"

// checkRemovable refuses to delete or trash a volume that is in use,
// unless forced: published, or open for writing; and, forced or not, one
// whose snapshots clones read (they open it by name). op names the
// operation and the volume ("delete volume \"vol0\""): the errors begin
// with it, the way cairn-ops reports a failed command, and name the volume
// only there.
func (l *leaderState) checkRemovable(ctx context.Context, v *mdspb.Volume, force bool, op string) error {
	if len(v.Publications) > 0 && !force {
		return status.Errorf(codes.FailedPrecondition, "%s: it is published to %s; unpublish it first, or force it %s", op, publishedTo(v), useForce)
	}
	if err := l.refuseIfCloned(ctx, v, nil, op); err != nil {
		return err
	}
	if force {
		return nil
	}
	sessions, err := l.liveSessions(ctx, v.Id)
	if err != nil {
		return err
	}
	for _, s := range sessions {
		if s.Writable && s.Epoch >= writerEpoch(v) { // a fenced writer cannot write
			return status.Errorf(codes.FailedPrecondition, "%s: it is open for writing by %q (session %s); close it first, or force it %s",
				op, s.Client, s.SessionId, useForce)
		}
	}
	return nil
}
