package mds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
)

// maxVolumeSize bounds volume sizes (4 PiB) so that offsets never overflow.
const maxVolumeSize = 4 << 50

// volumeByName reads a volume through its name index. Volumes being deleted
// have no name entry and are not found.
func (l *leaderState) volumeByName(ctx context.Context, name string) (*mdspb.Volume, int64, error) {
	if err := checkName("volume name", name); err != nil {
		return nil, 0, err
	}
	idStr, found, err := l.st.getRaw(ctx, l.st.k.volumeName(name))
	if err != nil {
		return nil, 0, err
	}
	if !found {
		return nil, 0, status.Errorf(codes.NotFound, "volume %q does not exist", name)
	}
	id, err := strconv.ParseUint(idStr, 10, 64)
	if err != nil {
		return nil, 0, fmt.Errorf("volume name %q maps to %q: %w", name, idStr, err)
	}
	v := &mdspb.Volume{}
	found, rev, err := l.st.get(ctx, l.st.k.volume(id), v)
	if err != nil {
		return nil, 0, err
	}
	if !found || v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
		return nil, 0, status.Errorf(codes.NotFound, "volume %q does not exist", name)
	}
	return v, rev, nil
}

// roundSize rounds a size up to whole segments, refusing 0 and oversized.
func (l *leaderState) roundSize(size uint64) (uint64, error) {
	seg := l.consts.SegmentSize
	if size == 0 {
		return 0, status.Error(codes.InvalidArgument, "volume size is 0")
	}
	if size > maxVolumeSize {
		return 0, status.Errorf(codes.InvalidArgument, "volume size %d exceeds the maximum %d", size, uint64(maxVolumeSize))
	}
	return (size + seg - 1) / seg * seg, nil
}

func (l *leaderState) createVolume(ctx context.Context, r *mdspb.CreateVolumeRequest) (*mdspb.CreateVolumeResponse, error) {
	if r.SourceVolume != "" || r.SourceSnapshot != "" {
		return l.createClone(ctx, r)
	}
	if err := checkNewName("volume name", r.Name); err != nil {
		return nil, err
	}
	size, err := l.roundSize(r.Size)
	if err != nil {
		return nil, err
	}
	pool, err := l.choosePool(r.Pool)
	if err != nil {
		return nil, err
	}
	nameKey := l.st.k.volumeName(r.Name)
	if _, found, err := l.st.getRaw(ctx, nameKey); err != nil {
		return nil, err
	} else if found {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists", r.Name)
	}
	id, err := l.st.reserveIDs(ctx, counterVolume, 1)
	if err != nil {
		return nil, err
	}
	v := &mdspb.Volume{
		Id: id, Name: r.Name, Size: size, Owner: r.Owner, LogicalPoolId: pool.Id,
		ChunkSize: l.consts.ChunkSize, SegmentSize: l.consts.SegmentSize,
		Status: mdspb.VolumeStatus_VOLUME_STATUS_CREATED, CreatedUnix: time.Now().Unix(),
	}
	ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(nameKey), "=", 0)},
		clientv3.OpPut(nameKey, strconv.FormatUint(id, 10)), putOp(l.st.k.volume(id), v))
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists", r.Name)
	}
	l.log.Info("volume created", "volume", r.Name, "id", id, "size", size, "pool", pool.Name, "owner", r.Owner)
	return &mdspb.CreateVolumeResponse{Volume: v}, nil
}

// choosePool finds a READY logical pool by name, or the first one when name
// is empty.
func (l *leaderState) choosePool(name string) (*mdspb.LogicalPool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var pools []*mdspb.LogicalPool
	for _, p := range l.mu.logicalPools {
		if name == "" || p.Name == name {
			pools = append(pools, p)
		}
	}
	sort.Slice(pools, func(i, j int) bool { return pools[i].Id < pools[j].Id })
	for _, p := range pools {
		if p.Status == mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
			return proto.CloneOf(p), nil
		}
	}
	switch {
	case len(pools) > 0:
		return nil, status.Errorf(codes.FailedPrecondition, "logical pool %q is still being created", pools[0].Name)
	case name != "":
		return nil, status.Errorf(codes.NotFound, "logical pool %q does not exist", name)
	default:
		return nil, status.Error(codes.FailedPrecondition, "no logical pool exists yet")
	}
}

func (l *leaderState) withAllocated(ctx context.Context, v *mdspb.Volume) (*mdspb.Volume, error) {
	n, err := l.st.count(ctx, l.st.k.volumeSegments(v.Id))
	if err != nil {
		return nil, err
	}
	v.AllocatedSegments = uint64(n)
	return v, nil
}

func (l *leaderState) statVolume(ctx context.Context, r *mdspb.StatVolumeRequest) (*mdspb.StatVolumeResponse, error) {
	v, _, err := l.volumeByName(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	if v, err = l.withAllocated(ctx, v); err != nil {
		return nil, err
	}
	sessions, err := l.liveSessions(ctx, v.Id)
	if err != nil {
		return nil, err
	}
	return &mdspb.StatVolumeResponse{Volume: v, Sessions: sessions}, nil
}

func (l *leaderState) listVolumes(ctx context.Context) (*mdspb.ListVolumesResponse, error) {
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return nil, err
	}
	for _, v := range vols {
		if _, err := l.withAllocated(ctx, v); err != nil {
			return nil, err
		}
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].Name < vols[j].Name })
	return &mdspb.ListVolumesResponse{Volumes: vols}, nil
}

func (l *leaderState) renameVolume(ctx context.Context, r *mdspb.RenameVolumeRequest) (*mdspb.RenameVolumeResponse, error) {
	if err := checkNewName("new volume name", r.NewName); err != nil {
		return nil, err
	}
	for {
		v, rev, err := l.volumeByName(ctx, r.Name)
		if err != nil {
			return nil, err
		}
		if r.NewName == r.Name {
			return &mdspb.RenameVolumeResponse{Volume: v}, nil
		}
		if err := l.refuseIfCloned(ctx, v, nil, fmt.Sprintf("volume %q cannot be renamed (its clones name it)", r.Name)); err != nil {
			return nil, err
		}
		oldKey, newKey, key := l.st.k.volumeName(r.Name), l.st.k.volumeName(r.NewName), l.st.k.volume(v.Id)
		v.Name = r.NewName
		ok, err := l.st.txn(ctx, []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(key), "=", rev),
			clientv3.Compare(clientv3.CreateRevision(newKey), "=", 0),
		}, clientv3.OpDelete(oldKey), clientv3.OpPut(newKey, strconv.FormatUint(v.Id, 10)), putOp(key, v))
		if err != nil {
			return nil, err
		}
		if ok {
			l.log.Info("volume renamed", "from", r.Name, "to", r.NewName, "id", v.Id)
			return &mdspb.RenameVolumeResponse{Volume: v}, nil
		}
		if _, found, err := l.st.getRaw(ctx, newKey); err != nil {
			return nil, err
		} else if found {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q already exists", r.NewName)
		}
	}
}

// deleteVolume marks a volume DELETING and frees its name at once; the
// background loop frees its chunks and then removes its records.
func (l *leaderState) deleteVolume(ctx context.Context, r *mdspb.DeleteVolumeRequest) (*mdspb.DeleteVolumeResponse, error) {
	if r.Name == "" && r.TrashedId != 0 {
		if err := l.purgeTrashed(ctx, r.TrashedId); err != nil {
			return nil, err
		}
		return &mdspb.DeleteVolumeResponse{}, nil
	}
	for {
		v, rev, err := l.volumeByName(ctx, r.Name)
		if err != nil {
			return nil, err
		}
		if n := len(liveSnapshots(v)); n > 0 && !r.Force {
			return nil, status.Errorf(codes.FailedPrecondition, "delete volume %q: it has %d snapshot(s); delete them first, or force it %s", r.Name, n, useForce)
		}
		if err := l.checkRemovable(ctx, v, r.Force, fmt.Sprintf("delete volume %q", r.Name)); err != nil {
			return nil, err
		}
		key := l.st.k.volume(v.Id)
		v.Status = mdspb.VolumeStatus_VOLUME_STATUS_DELETING
		ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)},
			putOp(key, v), clientv3.OpDelete(l.st.k.volumeName(r.Name)))
		if err != nil {
			return nil, err
		}
		if ok {
			l.log.Info("volume deleting", "volume", r.Name, "id", v.Id)
			l.forgetDeleted(ctx, v)
			l.wake()
			return &mdspb.DeleteVolumeResponse{}, nil
		}
	}
}

func newSessionID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// openVolume opens a volume. A writable open bumps the volume's epoch and
// returns only once no chunkserver can admit a request with an older epoch
// (fenceEpoch).
func (l *leaderState) openVolume(ctx context.Context, r *mdspb.OpenVolumeRequest) (*mdspb.OpenVolumeResponse, error) {
	if err := checkName("volume name", r.Name); err != nil {
		return nil, err
	}
	if r.Node != "" {
		if err := checkName("node name", r.Node); err != nil {
			return nil, err
		}
	}
	now := time.Now()
	sess := &mdspb.Session{
		SessionId: newSessionID(), Volume: r.Name, Client: r.Client, Writable: r.Writable, Node: r.Node, Features: r.Features,
		OpenedUnix: now.Unix(), ExpiresUnix: leaseEnd(now, l.s.cfg.SessionLease),
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		sess.ClientAddress = p.Addr.String()
	}
	if !r.Writable {
		for {
			v, rev, err := l.volumeByName(ctx, r.Name)
			if err != nil {
				return nil, err
			}
			if err := checkPublishedOpen(v, r.Node, false); err != nil {
				return nil, err
			}
			if err := checkCloneOpen(v, r.Features); err != nil {
				return nil, err
			}
			sess.Epoch = v.Epoch
			// The publication checked is the one in force when the
			// session is recorded.
			key := l.st.k.volume(v.Id)
			ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)},
				putOp(l.st.k.session(v.Id, sess.SessionId), sess))
			if err != nil {
				return nil, err
			}
			if ok {
				return l.openResponse(v, sess), nil
			}
		}
	}
	v, version, bumped, err := l.updateVolume(ctx, r.Name, sess, func(v *mdspb.Volume) (fenceKind, error) {
		if err := checkCloneOpen(v, r.Features); err != nil {
			return noFence, err
		}
		if len(liveSnapshots(v)) > 0 && !slices.Contains(r.Features, cloneFeature) {
			return noFence, status.Errorf(codes.FailedPrecondition, "volume %q has snapshots, and this client predates them: its writes would not keep what the snapshots read (upgrade it)", r.Name)
		}
		return fenceWriters, checkPublishedOpen(v, r.Node, true)
	})
	if err != nil {
		return nil, err
	}
	if err := l.fenceEpoch(ctx, v, version, bumped); err != nil {
		return nil, err
	}
	l.log.Info("volume opened for writing", "volume", r.Name, "epoch", v.Epoch, "client", r.Client, "session", sess.SessionId)
	return l.openResponse(v, sess), nil
}

// errNoChange is returned by an updateVolume function when the volume
// already is as asked: nothing is written.
var errNoChange = errors.New("volume unchanged")

// fenceKind is what an updateVolume change asks of the volume's epoch.
type fenceKind int

const (
	// noFence leaves the epoch alone.
	noFence fenceKind = iota
	// fenceWriters raises the epoch and fences every earlier writer
	// (a writable open, a publication change).
	fenceWriters
	// newSequence raises the epoch so that chunkservers refuse writes
	// under the volume's old sequence number; the writer is not fenced
	// and takes the new epoch (a snapshot).
	newSequence
)

// writerEpoch is the epoch a writable session needs to be the volume's
// writer (Volume.writer_epoch; 0 on records from before snapshots).
func writerEpoch(v *mdspb.Volume) uint64 {
	if v.WriterEpoch == 0 {
		return v.Epoch
	}
	return v.WriterEpoch
}

// updateVolume applies fn to the volume named name and writes the result in
// one transaction, retrying on conflict. When fn asks to fence, the same
// transaction raises the volume's epoch and the epoch table version, and
// records sess (if any) at the new epoch; updateVolume then returns the new
// table version and when the bump took effect: every heartbeat answered
// after that moment carries the new table to a chunkserver that does not
// hold it (fenceEpoch waits for that). Without a fence it returns version 0.
// fn may be called several times, each time on a fresh copy.
func (l *leaderState) updateVolume(ctx context.Context, name string, sess *mdspb.Session,
	fn func(v *mdspb.Volume) (fenceKind, error)) (*mdspb.Volume, uint64, time.Time, error) {
	l.epochWrite.Lock()
	defer l.epochWrite.Unlock()
	for {
		v, rev, err := l.volumeByName(ctx, name)
		if err != nil {
			return nil, 0, time.Time{}, err
		}
		kind, err := fn(v)
		fence := kind != noFence
		if errors.Is(err, errNoChange) {
			return v, 0, time.Time{}, nil
		}
		if err != nil {
			return nil, 0, time.Time{}, err
		}
		key := l.st.k.volume(v.Id)
		cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}
		var ops []clientv3.Op
		var ver uint64
		verKey := l.st.k.counter(counterEpochTable)
		if fence {
			l.mu.Lock()
			ver = l.mu.epochVersion
			l.mu.Unlock()
			verCmp := clientv3.Compare(clientv3.CreateRevision(verKey), "=", 0)
			if ver > 0 {
				verCmp = clientv3.Compare(clientv3.Value(verKey), "=", strconv.FormatUint(ver, 10))
			}
			cmps = append(cmps, verCmp)
			if v.WriterEpoch == 0 {
				v.WriterEpoch = v.Epoch
			}
			v.Epoch++
			if kind == fenceWriters {
				v.WriterEpoch = v.Epoch
			}
			ops = append(ops, clientv3.OpPut(verKey, strconv.FormatUint(ver+1, 10)))
		}
		ops = append(ops, putOp(key, v))
		if sess != nil {
			sess.Epoch = v.Epoch
			ops = append(ops, putOp(l.st.k.session(v.Id, sess.SessionId), sess))
		}
		ok, err := l.st.txn(ctx, cmps, ops...)
		if err != nil {
			return nil, 0, time.Time{}, err
		}
		if ok {
			if !fence {
				return v, 0, time.Time{}, nil
			}
			now := time.Now()
			l.mu.Lock()
			l.mu.epochVersion = ver + 1
			l.mu.fences[v.Id] = pendingFence{version: ver + 1, bumped: now}
			l.mu.Unlock()
			return v, ver + 1, now, nil
		}
		// The volume changed under us, or the version counter is not what
		// we cached: reload it and try again.
		if fence {
			cur, err := l.st.readCounter(ctx, counterEpochTable)
			if err != nil {
				return nil, 0, time.Time{}, err
			}
			l.mu.Lock()
			l.mu.epochVersion = max(l.mu.epochVersion, cur)
			l.mu.Unlock()
		}
	}
}

func (l *leaderState) openResponse(v *mdspb.Volume, sess *mdspb.Session) *mdspb.OpenVolumeResponse {
	return &mdspb.OpenVolumeResponse{
		Volume: v, Session: sess, LeaseSeconds: uint32(l.s.cfg.SessionLease / time.Second),
		Constants: proto.CloneOf(l.consts),
	}
}

// leaseEnd is the expiry, in whole Unix seconds, of a lease granted at now:
// rounded up, so that a session never lives shorter than the lease.
func leaseEnd(now time.Time, lease time.Duration) int64 {
	end := now.Add(lease)
	if end.Truncate(time.Second).Equal(end) {
		return end.Unix()
	}
	return end.Unix() + 1
}

// liveSessions lists a volume's unexpired sessions.
func (l *leaderState) liveSessions(ctx context.Context, volID uint64) ([]*mdspb.Session, error) {
	all, err := list[mdspb.Session](ctx, l.st, l.st.k.volumeSessions(volID))
	if err != nil {
		return nil, err
	}
	now := time.Now().Unix()
	var out []*mdspb.Session
	for _, s := range all {
		if s.ExpiresUnix > now {
			out = append(out, s)
		}
	}
	return out, nil
}

func (l *leaderState) refreshSession(ctx context.Context, r *mdspb.RefreshSessionRequest) (*mdspb.RefreshSessionResponse, error) {
	v, _, err := l.volumeByName(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	if r.SessionId == "" {
		return nil, status.Error(codes.InvalidArgument, "session id is empty")
	}
	key := l.st.k.session(v.Id, r.SessionId)
	sess := &mdspb.Session{}
	found, rev, err := l.st.get(ctx, key, sess)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	if !found || sess.ExpiresUnix <= now.Unix() {
		return nil, status.Errorf(codes.NotFound, "session %s of volume %q expired or never existed; open the volume again", r.SessionId, r.Name)
	}
	if sess.Writable && sess.Epoch < writerEpoch(v) {
		return nil, status.Errorf(codes.FailedPrecondition, "session %s of volume %q was fenced: the volume was opened for writing again (epoch %d > %d)",
			r.SessionId, r.Name, writerEpoch(v), sess.Epoch)
	}
	sess.Volume = v.Name
	sess.ExpiresUnix = leaseEnd(now, l.s.cfg.SessionLease)
	ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}, putOp(key, sess))
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, status.Errorf(codes.Aborted, "session %s changed concurrently; retry", r.SessionId)
	}
	if v, err = l.withAllocated(ctx, v); err != nil {
		return nil, err
	}
	return &mdspb.RefreshSessionResponse{Volume: v, Session: sess}, nil
}

// closeVolume ends a session. Closing a session that already ended succeeds.
func (l *leaderState) closeVolume(ctx context.Context, r *mdspb.CloseVolumeRequest) (*mdspb.CloseVolumeResponse, error) {
	v, _, err := l.volumeByName(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	if r.SessionId == "" {
		return nil, status.Error(codes.InvalidArgument, "session id is empty")
	}
	key := l.st.k.session(v.Id, r.SessionId)
	for {
		sess := &mdspb.Session{}
		found, rev, err := l.st.get(ctx, key, sess)
		if err != nil {
			return nil, err
		}
		if !found {
			return &mdspb.CloseVolumeResponse{}, nil // closed already: nothing to say again
		}
		ok, err := l.st.txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)}, clientv3.OpDelete(key))
		if err != nil {
			return nil, err
		}
		if ok {
			l.logSessionClosed(ctx, r.Name, sess)
			return &mdspb.CloseVolumeResponse{}, nil
		}
		// Refreshed meanwhile: read it again.
	}
}

// logSessionClosed logs the close of a session once, with its volume: at
// info level when an operator closed it (a caller with the operator role
// and not the client role, under TLS) or it could write (as its open was
// logged), at debug level for a reader closing its own session.
func (l *leaderState) logSessionClosed(ctx context.Context, volume string, sess *mdspb.Session) {
	attrs := []any{"volume", volume, "session", sess.SessionId, "client", sess.Client, "writable", sess.Writable}
	if name, ok := operatorName(ctx); ok {
		l.log.Info("session closed by an operator", append(attrs, "operator", name)...)
		return
	}
	level := slog.LevelDebug
	if sess.Writable {
		level = slog.LevelInfo
	}
	l.log.Log(ctx, level, "session closed", attrs...)
}

// operatorName returns the certificate name of the caller in ctx when it is
// an operator: its verified certificate has the operator role and not the
// client role (a client closes its own sessions). Without TLS nobody is.
func operatorName(ctx context.Context) (string, bool) {
	caller, err := certs.PeerOf(ctx)
	if err != nil || !slices.Contains(caller.Roles, certs.RoleOperator) || slices.Contains(caller.Roles, certs.RoleClient) {
		return "", false
	}
	return caller.Name, true
}

func (l *leaderState) listSessions(ctx context.Context, r *mdspb.ListSessionsRequest) (*mdspb.ListSessionsResponse, error) {
	if r.Name != "" {
		v, _, err := l.volumeByName(ctx, r.Name)
		if err != nil {
			return nil, err
		}
		s, err := l.liveSessions(ctx, v.Id)
		if err != nil {
			return nil, err
		}
		for _, x := range s {
			x.Volume = v.Name
		}
		return &mdspb.ListSessionsResponse{Sessions: s}, nil
	}
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return nil, err
	}
	out := &mdspb.ListSessionsResponse{}
	for _, v := range vols {
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_CREATED {
			continue
		}
		s, err := l.liveSessions(ctx, v.Id)
		if err != nil {
			return nil, err
		}
		for _, x := range s {
			x.Volume = v.Name // the name may have changed since the open
		}
		out.Sessions = append(out.Sessions, s...)
	}
	return out, nil
}
