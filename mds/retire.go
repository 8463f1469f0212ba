package mds

import (
	"context"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
)

// Draining and removing chunkservers. An operator sets chunkservers
// RETIRING (one, or every one of a server or zone); the drain scheduler
// moves their replicas off and marks each RETIRED once no copyset names it.
// READWRITE cancels a drain (or returns a retired chunkserver to use). A
// chunkserver that registers again without its identity (its disk was
// replaced or wiped) becomes a new chunkserver, and the old record is
// RETIRED at once so that its replicas are rebuilt without waiting for the
// recover-after delay. A RETIRED or OFFLINE chunkserver that no copyset
// names can be deleted.

// updateChunkServer changes the read-write state of the selected
// chunkservers.
func (l *leaderState) updateChunkServer(ctx context.Context, r *mdspb.UpdateChunkServerRequest) (*mdspb.UpdateChunkServerResponse, error) {
	selectors := 0
	for _, set := range []bool{r.ChunkserverId != 0, r.ServerId != 0, r.ZoneId != 0} {
		if set {
			selectors++
		}
	}
	if selectors != 1 {
		return nil, status.Error(codes.InvalidArgument, "name exactly one of a chunkserver, a server or a zone")
	}
	if r.RwState != mdspb.RWState_RW_STATE_RETIRING && r.RwState != mdspb.RWState_RW_STATE_READWRITE {
		return nil, status.Errorf(codes.InvalidArgument, "state %s cannot be set: set RETIRING to drain or READWRITE to cancel; RETIRED follows a drain", r.RwState)
	}
	l.mu.Lock()
	var sel []*mdspb.ChunkServer
	for _, e := range l.mu.chunkServers {
		if r.ChunkserverId == e.rec.Id || r.ServerId == e.rec.ServerId || r.ZoneId == e.rec.ZoneId {
			sel = append(sel, proto.CloneOf(e.rec))
		}
	}
	l.mu.Unlock()
	slices.SortFunc(sel, func(a, b *mdspb.ChunkServer) int { return int(a.Id) - int(b.Id) })
	if len(sel) == 0 {
		switch {
		case r.ChunkserverId != 0:
			return nil, status.Errorf(codes.NotFound, "chunkserver %d does not exist", r.ChunkserverId)
		case r.ServerId != 0:
			return nil, status.Errorf(codes.NotFound, "server %d has no chunkservers", r.ServerId)
		default:
			return nil, status.Errorf(codes.NotFound, "zone %d has no chunkservers", r.ZoneId)
		}
	}
	out := &mdspb.UpdateChunkServerResponse{}
	for _, rec := range sel {
		// A drain cannot start over a retired chunkserver: it holds
		// nothing.
		if rec.RwState != r.RwState && !(r.RwState == mdspb.RWState_RW_STATE_RETIRING && rec.RwState == mdspb.RWState_RW_STATE_RETIRED) {
			if err := l.setRWState(ctx, rec, r.RwState); err != nil {
				return nil, err
			}
		}
		l.mu.Lock()
		if e := l.mu.chunkServers[rec.Id]; e != nil {
			out.Chunkservers = append(out.Chunkservers, l.chunkServerViewLocked(e, time.Now(), l.copysetCountsLocked()))
		}
		l.mu.Unlock()
	}
	return out, nil
}

// deleteChunkServer removes a chunkserver that holds nothing from the
// topology.
func (l *leaderState) deleteChunkServer(ctx context.Context, r *mdspb.DeleteChunkServerRequest) (*mdspb.DeleteChunkServerResponse, error) {
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	l.mu.Lock()
	e := l.mu.chunkServers[r.ChunkserverId]
	var err error
	switch {
	case e == nil:
		err = status.Errorf(codes.NotFound, "chunkserver %d does not exist", r.ChunkserverId)
	case l.holdsReplicasLocked(r.ChunkserverId):
		n := l.copysetCountsLocked()[r.ChunkserverId][0]
		if e.rec.RwState == mdspb.RWState_RW_STATE_RETIRING {
			err = status.Errorf(codes.FailedPrecondition, "chunkserver %d still holds %d copyset replicas: it is retiring; wait until it reads retired (see: cairn-ops status)", r.ChunkserverId, n)
		} else {
			err = status.Errorf(codes.FailedPrecondition, "chunkserver %d still holds %d copyset replicas: drain it first (update chunkserver %d --state retiring)", r.ChunkserverId, n, r.ChunkserverId)
		}
	case e.rec.RwState != mdspb.RWState_RW_STATE_RETIRED && l.onlineStateLocked(e, time.Now()) != mdspb.OnlineState_ONLINE_STATE_OFFLINE:
		err = status.Errorf(codes.FailedPrecondition, "chunkserver %d is %s and online: retire it first (update chunkserver %d --state retiring)",
			r.ChunkserverId, e.rec.RwState.Label(), r.ChunkserverId)
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if _, err := l.st.txn(ctx, nil, clientv3.OpDelete(l.st.k.chunkServer(r.ChunkserverId)), clientv3.OpDelete(l.st.k.token(r.ChunkserverId))); err != nil {
		return nil, err
	}
	l.mu.Lock()
	delete(l.mu.chunkServers, r.ChunkserverId)
	l.mu.Unlock()
	l.log.Info("chunkserver deleted", "chunkserver", r.ChunkserverId)
	return &mdspb.DeleteChunkServerResponse{}, nil
}
