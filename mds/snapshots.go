package mds

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
)

// Snapshots. A volume's writes carry its sequence number; a snapshot
// records the current one and moves the volume to the next, in the same
// transaction as an epoch raise that leaves the writer in place
// (newSequence): once fenceEpoch returns, every chunkserver refuses writes
// under the old epoch, so under the old sequence number, and the writer,
// told so, takes the new epoch and sequence number from its session. The
// first write of each chunk under the new number keeps the chunk's old
// state in the chunkserver (copy on write, replicated through Raft): taking
// a snapshot copies nothing. Deleting one marks it DELETING (unreadable at
// once); the background work then trims every chunk of the volume down to
// what the remaining snapshots read and removes the record.

// checkNewName checks the name of a new volume or snapshot: frontends
// export a snapshot as VOLUME@SNAPSHOT, so neither may hold an "@".
func checkNewName(what, name string) error {
	if err := checkName(what, name); err != nil {
		return err
	}
	if strings.Contains(name, "@") {
		return status.Errorf(codes.InvalidArgument, "%s %q contains \"@\" (a snapshot is named VOLUME@SNAPSHOT)", what, name)
	}
	if strings.Contains(name, ":snap:") {
		return status.Errorf(codes.InvalidArgument, "%s %q contains \":snap:\" (iSCSI names a snapshot's target VOLUME:snap:SNAPSHOT)", what, name)
	}
	return nil
}

// maxSnapshots bounds the snapshots of one volume.
const maxSnapshots = 128

// liveSnapshots returns the sequence numbers of the snapshots a volume's
// chunks keep data for (readable or being created), ascending.
func liveSnapshots(v *mdspb.Volume) []uint64 {
	var live []uint64
	for _, s := range v.Snapshots {
		if s.Kept() {
			live = append(live, s.Seq)
		}
	}
	slices.Sort(live)
	return live
}

func (l *leaderState) createSnapshot(ctx context.Context, r *mdspb.CreateSnapshotRequest) (*mdspb.CreateSnapshotResponse, error) {
	if err := checkName("volume name", r.Volume); err != nil {
		return nil, err
	}
	if err := checkNewName("snapshot name", r.Name); err != nil {
		return nil, err
	}
	var snap *mdspb.Snapshot
	retried := false
	v, version, bumped, err := l.updateVolume(ctx, r.Volume, nil, func(v *mdspb.Volume) (fenceKind, error) {
		snap, retried = nil, false
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
			return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is being deleted", r.Volume)
		}
		if err := l.checkSnapshotWriters(ctx, v); err != nil {
			return noFence, err
		}
		if cs := v.GetCloneSource(); cs != nil && cs.FlattenedUnix == 0 && !cloneSnapshotsFit(l.consts) {
			return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is a clone of %s@%s that is not flattened, and this cluster's chunks are too large to snapshot it before (flatten it first: cairn-ops flatten %s)",
				r.Volume, cs.Volume, cs.Snapshot, r.Volume)
		}
		for _, s := range v.Snapshots {
			if s.Name != r.Name || s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING {
				continue // a deleted snapshot's name is free at once
			}
			if s.Kept() && (s.Seq+1 == v.Seq || s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_CREATING) {
				// The newest, or one whose fence did not complete: a
				// retry of the call that took it.
				snap, retried = proto.CloneOf(s), true
				return noFence, errNoChange
			}
			return noFence, status.Errorf(codes.AlreadyExists, "volume %q already has a snapshot %q (%s)", r.Volume, r.Name, s.Status.Label())
		}
		if len(v.Snapshots) >= maxSnapshots {
			return noFence, status.Errorf(codes.ResourceExhausted, "volume %q has %d snapshots, the most it may have; delete some first", r.Volume, len(v.Snapshots))
		}
		seq := max(v.Seq, 1)
		snap = &mdspb.Snapshot{Name: r.Name, Seq: seq, CreatedUnix: time.Now().Unix(), Status: mdspb.SnapshotStatus_SNAPSHOT_STATUS_CREATING, Size: v.Size}
		v.Snapshots = append(v.Snapshots, proto.CloneOf(snap))
		v.Seq = seq + 1
		return newSequence, nil
	})
	if err != nil {
		return nil, err
	}
	if retried {
		err = l.fenceAgain(ctx, v)
	} else {
		err = l.fenceEpoch(ctx, v, version, bumped)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot %q of volume %q is recorded, but not every chunkserver confirmed it (ask again to finish it): %w", r.Name, r.Volume, err)
	}
	// Every chunkserver refuses the old sequence number: readable now, and
	// so is any older snapshot whose own fence did not complete (this one
	// covers it).
	_, _, _, err = l.updateVolume(ctx, r.Volume, nil, func(v *mdspb.Volume) (fenceKind, error) {
		changed := false
		for _, s := range v.Snapshots {
			if s.Seq <= snap.Seq && s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_CREATING {
				s.Status = mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY
				changed = true
			}
		}
		if !changed {
			return noFence, errNoChange
		}
		return noFence, nil
	})
	if err != nil {
		return nil, fmt.Errorf("snapshot %q of volume %q: mark it ready (ask again to finish it): %w", r.Name, r.Volume, err)
	}
	snap.Status = mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY
	l.log.Info("snapshot taken", "volume", r.Volume, "snapshot", r.Name, "seq", snap.Seq, "epoch", v.Epoch)
	return &mdspb.CreateSnapshotResponse{Snapshot: snap}, nil
}

// checkSnapshotWriters refuses a snapshot that something writing the
// volume would not keep: a chunkserver of its pool, or a client with the
// volume open for writing, that predates sequence numbers (checked in the
// transaction's function, so a writable open racing the snapshot changes
// the volume's revision and is seen on the retry).
func (l *leaderState) checkSnapshotWriters(ctx context.Context, v *mdspb.Volume) error {
	if err := l.checkPoolFeature(v.LogicalPoolId, "snapshots", false); err != nil {
		return err
	}
	sessions, err := l.liveSessions(ctx, v.Id)
	if err != nil {
		return err
	}
	for _, s := range sessions {
		if s.Writable && s.Epoch >= writerEpoch(v) && !slices.Contains(s.Features, cloneFeature) {
			return status.Errorf(codes.FailedPrecondition, "volume %q is open for writing by %q (session %s), a client that predates snapshots: its writes would not keep what the snapshot reads (upgrade it, or close it first)",
				v.Name, s.Client, s.SessionId)
		}
	}
	return nil
}

func (l *leaderState) listSnapshots(ctx context.Context, r *mdspb.ListSnapshotsRequest) (*mdspb.ListSnapshotsResponse, error) {
	v, _, err := l.volumeByName(ctx, r.Volume)
	if err != nil {
		return nil, err
	}
	return &mdspb.ListSnapshotsResponse{Snapshots: v.Snapshots}, nil
}

// deleteSnapshot marks a snapshot DELETING, unreadable at once, and raises
// the volume's epoch (leaving the writer in place) so that writers stop
// keeping chunks for it; trimDeletedSnapshots gives its space back later.
func (l *leaderState) deleteSnapshot(ctx context.Context, r *mdspb.DeleteSnapshotRequest) (*mdspb.DeleteSnapshotResponse, error) {
	v, version, bumped, err := l.updateVolume(ctx, r.Volume, nil, func(v *mdspb.Volume) (fenceKind, error) {
		i := slices.IndexFunc(v.Snapshots, func(s *mdspb.Snapshot) bool {
			return s.Name == r.Name && s.Status != mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING
		})
		switch {
		case i < 0 && slices.ContainsFunc(v.Snapshots, func(s *mdspb.Snapshot) bool { return s.Name == r.Name }):
			return noFence, errNoChange // being deleted already
		case i < 0:
			return noFence, status.Errorf(codes.NotFound, "volume %q has no snapshot %q", r.Volume, r.Name)
		}
		if err := l.refuseIfCloned(ctx, v, v.Snapshots[i], fmt.Sprintf("snapshot %s@%s cannot be deleted", r.Volume, r.Name)); err != nil {
			return noFence, err
		}
		v.Snapshots[i].Status = mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING
		v.Snapshots[i].DeletingUnix = time.Now().Unix()
		return newSequence, nil
	})
	if err != nil {
		return nil, err
	}
	if version != 0 {
		err = l.fenceEpoch(ctx, v, version, bumped)
	} else {
		err = l.fenceAgain(ctx, v) // a retry: the first call's fence may not have completed
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot %q of volume %q is deleted, but not every chunkserver confirmed the volume's new epoch (ask again): %w", r.Name, r.Volume, err)
	}
	l.log.Info("snapshot deleting", "volume", r.Volume, "snapshot", r.Name)
	l.wake()
	return &mdspb.DeleteSnapshotResponse{}, nil
}

// trimDeletedSnapshots finishes snapshot deletions: every chunk of a
// volume with DELETING snapshots is trimmed to what its READY ones read,
// then the DELETING records go. A trim is idempotent, so the work resumes
// from the start after a failure or a failover.
func (l *leaderState) trimDeletedSnapshots(ctx context.Context) error {
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return err
	}
	// Handles reading a deleted snapshot learn it within a session lease
	// (their session refreshes); until then its data stays.
	settled := time.Now().Add(-l.s.cfg.SessionLease - time.Second).Unix()
	var errs []error
	for _, v := range vols {
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED ||
			!slices.ContainsFunc(v.Snapshots, func(s *mdspb.Snapshot) bool {
				return s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING && s.DeletingUnix <= settled
			}) {
			continue
		}
		if err := l.trimVolume(ctx, v, settled); err != nil {
			errs = append(errs, fmt.Errorf("volume %q (id %d): %w", v.Name, v.Id, err))
		}
	}
	return errors.Join(errs...)
}

func (l *leaderState) trimVolume(ctx context.Context, v *mdspb.Volume, settled int64) error {
	live, bound := liveSnapshots(v), max(v.Seq, 1)
	for _, s := range v.Snapshots {
		if s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING && s.DeletingUnix > settled {
			live = append(live, s.Seq) // deleted too recently: handles may still read it
		}
	}
	slices.Sort(live)
	var deleting []uint64 // by sequence number: a name is free once its snapshot is deleting
	for _, s := range v.Snapshots {
		if s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING && s.DeletingUnix <= settled {
			deleting = append(deleting, s.Seq)
		}
	}
	segs, err := list[mdspb.Segment](ctx, l.st, l.st.k.volumeSegments(v.Id))
	if err != nil {
		return err
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		sem      = make(chan struct{}, 8)
		chunks   int
	)
	for _, seg := range segs {
		for _, ref := range seg.Chunks {
			chunks++
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				req := &chunkpb.TrimChunkRequest{Copyset: ref.Copyset, ChunkId: ref.ChunkId, VolumeId: v.Id, Live: live, Bound: bound}
				err := l.onChunkLeader(ctx, ref, func(ctx context.Context, cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, string, error) {
					resp, err := cl.TrimChunk(ctx, req)
					return resp.GetStatus(), resp.GetLeader(), resp.GetMessage(), err
				})
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("trim chunk %d: %w", ref.ChunkId, err)
					}
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	_, _, _, err = l.updateVolume(ctx, v.Name, nil, func(cur *mdspb.Volume) (fenceKind, error) {
		if cur.Id != v.Id {
			return noFence, errNoChange // deleted and created again meanwhile
		}
		n := len(cur.Snapshots)
		cur.Snapshots = slices.DeleteFunc(cur.Snapshots, func(s *mdspb.Snapshot) bool {
			return s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING && slices.Contains(deleting, s.Seq)
		})
		if len(cur.Snapshots) == n {
			return noFence, errNoChange
		}
		return noFence, nil
	})
	if err != nil {
		return err
	}
	l.log.Info("snapshots deleted", "volume", v.Name, "snapshots", deleting, "chunks_trimmed", chunks)
	return nil
}

// onChunkLeader runs call against a chunk's copyset leader, following
// redirects and falling back to the other members. A chunk that does not
// exist counts as done.
func (l *leaderState) onChunkLeader(ctx context.Context, ref *mdspb.ChunkRef,
	call func(ctx context.Context, cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, string, error)) error {
	l.mu.Lock()
	c := l.mu.copysets[ref.Copyset.Key()]
	var candidates []string
	if c != nil {
		view := l.copysetViewLocked(c)
		for _, p := range view.Peers {
			if p.ChunkserverId == c.LeaderId {
				candidates = append([]string{p.Address}, candidates...)
			} else {
				candidates = append(candidates, p.Address)
			}
		}
	}
	l.mu.Unlock()
	if len(candidates) == 0 {
		return fmt.Errorf("chunk %d: copyset %s is unknown", ref.ChunkId, ref.Copyset.Name())
	}
	var lastErr error
	tried := map[string]int{}
	for i := 0; i < len(candidates)+3 && len(candidates) > 0; i++ {
		addr := candidates[0]
		candidates = candidates[1:]
		if tried[addr] >= 2 {
			continue
		}
		tried[addr]++
		cc, err := l.s.conns.Get(addr)
		if err != nil {
			lastErr = fmt.Errorf("%s: %w", addr, err)
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, l.s.cfg.RPCTimeout)
		st, leader, msg, err := call(cctx, chunkpb.NewChunkServiceClient(cc))
		cancel()
		if err != nil {
			lastErr = fmt.Errorf("%s: %w", addr, err)
			continue
		}
		switch st {
		case chunkpb.Status_STATUS_OK, chunkpb.Status_STATUS_CHUNK_NOTEXIST:
			return nil
		case chunkpb.Status_STATUS_REDIRECTED:
			if h := leader.GetAddress(); h != "" {
				candidates = append([]string{h}, candidates...)
			}
			lastErr = fmt.Errorf("%s: redirected to %q", addr, leader.GetAddress())
		default:
			lastErr = fmt.Errorf("%s: %s: %s", addr, st, msg)
		}
	}
	return fmt.Errorf("copyset %s: %w", ref.Copyset.Name(), lastErr)
}
