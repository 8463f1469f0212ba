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
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// heartbeat records a chunkserver's liveness, capacity and copyset reports
// and answers with the operators for copysets it leads, copysets it should
// drop, and the volume epoch table when its copy is behind.
func (l *leaderState) heartbeat(ctx context.Context, r *mdspb.HeartbeatRequest) (*mdspb.HeartbeatResponse, error) {
	now := time.Now()
	resp := &mdspb.HeartbeatResponse{EpochLeaseMs: l.epochLeaseMs()}
	var changed []uint64
	var dropOps []uint64
	var newOps []*mdspb.Operator
	var newAddr *mdspb.ChunkServer
	ended := false // an operator ended: the schedulers may have room
	// push are operators queued here for copysets the reporter does not
	// lead: they go to their leaders once written.
	var push []*mdspb.Operator

	l.mu.Lock()
	e := l.mu.chunkServers[r.ChunkserverId]
	if e == nil {
		l.mu.Unlock()
		return nil, status.Errorf(codes.NotFound, "chunkserver %d is not registered", r.ChunkserverId)
	}
	if e.token != r.Token {
		l.mu.Unlock()
		return nil, status.Errorf(codes.Unauthenticated, "chunkserver %d: token does not match", r.ChunkserverId)
	}
	e.lastHB = now
	e.epochVersion = r.EpochTableVersion
	e.features = r.Features
	if r.Capacity != nil {
		e.capacity = r.Capacity
	}
	if r.Address != "" && r.Address != e.rec.Address {
		newAddr = proto.CloneOf(e.rec)
		newAddr.Address = r.Address
	}
	held := make(map[uint64]bool, len(r.Copysets)) // copysets the reporter holds a healthy replica of
	for _, rep := range r.Copysets {
		cs := rep.GetStatus()
		if cs == nil || cs.Copyset == nil {
			continue
		}
		key := cs.Copyset.Key()
		held[key] = cs.GetBroken() == ""
		rec := l.mu.copysets[key]
		if rec == nil {
			continue // not a copyset of this cluster's pools: leave it alone
		}
		member := slices.ContainsFunc(rec.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == r.ChunkserverId })
		if reason := cs.GetBroken(); reason != "" {
			if op := l.noteBrokenLocked(key, rec, r.ChunkserverId, reason); op != nil {
				newOps = append(newOps, op)
			}
		}
		if cs.ConfEpoch < rec.ConfEpoch {
			// An old configuration: the copyset moved on without this
			// replica, unless it is one being added (it learns its
			// configuration from the snapshot it waits for).
			if !member && !l.joiningLocked(key, rec, r.ChunkserverId, cs) {
				resp.RemoveCopysets = append(resp.RemoveCopysets, proto.CloneOf(cs.Copyset))
				resp.RemoveConfEpochs = append(resp.RemoveConfEpochs, rec.ConfEpoch)
			}
			continue
		}
		leader := cs.Role == copysetpb.Role_ROLE_LEADER
		newer := cs.ConfEpoch > rec.ConfEpoch
		switch {
		case leader && (newer || cs.Term >= rec.Term):
			if l.applyReportLocked(rec, cs, r.ChunkserverId, now) {
				changed = append(changed, key)
			}
		case !leader && newer:
			// A follower that applied a newer configuration than any leader
			// reported: trust the membership, not its idea of the leader.
			rec.Peers = clonePeers(cs.Peers)
			rec.Learners = clonePeers(cs.Learners)
			rec.ConfEpoch = cs.ConfEpoch
			if cs.Term > rec.Term {
				rec.Term, rec.LeaderId = cs.Term, cs.LeaderId
			}
			changed = append(changed, key)
		}
		if op := l.mu.operators[key]; op != nil && leader {
			l.noteAddProgressLocked(key, op, cs, now)
			switch result := operatorResult(op, cs, r.ChunkserverId); result {
			case "":
			case "continue":
				// An add whose learner joined: the same operator goes on
				// against the new configuration (promotion).
				op = proto.CloneOf(op)
				op.ConfEpoch = cs.ConfEpoch
				l.mu.operators[key] = op
				l.mu.unsaved[op] = true
				l.preparedLocked(key, op)
				newOps = append(newOps, op)
			default:
				dropOps, ended = append(dropOps, key), true
				if next := l.endOperatorLocked(key, op, result, cs, now); next != nil {
					newOps = append(newOps, next)
				}
			}
		} else if op != nil && op.Kind == mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER && cs.LeaderId == op.Target.GetChunkserverId() &&
			cs.Term > rec.Term && cs.ConfEpoch == rec.ConfEpoch {
			// The old leader, right after handing over: the target leads
			// at a newer term. Done without waiting for the target's own
			// report; the next step goes to the target directly.
			rec.LeaderId, rec.Term = cs.LeaderId, cs.Term
			changed = append(changed, key)
			dropOps, ended = append(dropOps, key), true
			if next := l.endOperatorLocked(key, op, "done", cs, now); next != nil {
				newOps = append(newOps, next)
				push = append(push, next)
			}
		}
		if op := l.continueRebuildLocked(key, rec, r.ChunkserverId, cs); op != nil {
			newOps = append(newOps, op)
		}
		// An operator goes out once durable; those queued by this call are
		// written before it answers.
		if op := l.mu.operators[key]; op != nil && leader && (!l.mu.unsaved[op] || slices.Contains(newOps, op)) && l.readyLocked(key, op) {
			resp.Operators = append(resp.Operators, proto.CloneOf(op))
		}
	}
	l.revokePreparedLocked(r.ChunkserverId, held)
	behind := r.EpochTableVersion < l.mu.epochVersion
	version := l.mu.epochVersion
	l.mu.Unlock()

	if newAddr != nil {
		if err := l.persistChunkServer(ctx, newAddr); err != nil {
			l.forgetUnsaved(newOps)
			return nil, err
		}
	}
	if err := l.persistCopysets(ctx, changed, dropOps); err != nil {
		l.forgetUnsaved(newOps)
		return nil, err
	}
	if err := l.persistOperators(ctx, newOps); err != nil {
		return nil, err
	}
	l.pushOperators(push)
	if len(newOps) > 0 {
		l.prepareAdds()
	}
	if ended {
		l.wakeScheduler()
	}
	if behind {
		vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
		if err != nil {
			return nil, err
		}
		resp.EpochTableVersion = version
		for _, v := range vols {
			if v.Epoch > 0 {
				resp.Epochs = append(resp.Epochs, &mdspb.VolumeEpoch{VolumeId: v.Id, Epoch: v.Epoch})
			}
		}
	}
	return resp, nil
}

// applyReportLocked takes a leader's report into the record and says whether
// anything worth persisting changed.
func (l *leaderState) applyReportLocked(rec *mdspb.Copyset, cs *copysetpb.CopysetStatus, reporter uint64, now time.Time) bool {
	persist := rec.LeaderId != reporter || rec.ConfEpoch != cs.ConfEpoch || rec.Term != cs.Term ||
		!samePeers(rec.Peers, cs.Peers) || !samePeers(rec.Learners, cs.Learners)
	rec.LeaderId = reporter
	rec.ConfEpoch = cs.ConfEpoch
	rec.Term = cs.Term
	l.mu.reported[rec.Id.Key()] = true
	if len(cs.Peers) > 0 {
		rec.Peers = clonePeers(cs.Peers)
	}
	rec.Learners = clonePeers(cs.Learners)
	rec.ChunkCount = cs.ChunkCount
	rec.AppliedIndex = cs.AppliedIndex
	rec.ReportedUnix = now.Unix()
	rec.Pending = proto.CloneOf(cs.Pending)
	rec.Progress = nil
	for _, p := range cs.Progress {
		rec.Progress = append(rec.Progress, proto.CloneOf(p))
	}
	return persist
}

// endOperatorLocked records the end of an operator (the caller deletes its
// etcd record) and returns the next step of its copyset, if any. l.mu held.
func (l *leaderState) endOperatorLocked(key uint64, op *mdspb.Operator, result string, cs *copysetpb.CopysetStatus, now time.Time) *mdspb.Operator {
	if result == "done" && op.Kind == mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER {
		l.noteMovedLocked(now, cs.ChunkCount*l.consts.ChunkSize)
	}
	delete(l.mu.operators, key)
	delete(l.mu.unsaved, op)
	delete(l.mu.progress, key)
	l.s.metrics.operatorsEnded.WithLabelValues(op.Kind.Label(), op.Reason, result).Inc()
	l.log.Info("operator ended", "copyset", op.Copyset.Name(),
		"kind", op.Kind.Label(), "target", op.Target.GetChunkserverId(), "reason", op.Reason, "result", result)
	return l.nextStepLocked(key, now)
}

// operatorResult says what a leader's report means for an operator: ""
// while it is under way; "continue" for an add whose target joined as a
// learner (the operator carries on against the new conf epoch); "done"
// when it took effect; "moot" when the configuration moved on without it.
func operatorResult(op *mdspb.Operator, cs *copysetpb.CopysetStatus, reporter uint64) string {
	target := op.Target.GetChunkserverId()
	has := func(ps []*commonpb.Peer) bool {
		return slices.ContainsFunc(ps, func(p *commonpb.Peer) bool { return p.ChunkserverId == target })
	}
	switch op.Kind {
	case mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER:
		if reporter == target {
			return "done"
		}
	case mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER:
		switch {
		case has(cs.Peers):
			return "done"
		case cs.ConfEpoch != op.ConfEpoch && has(cs.Learners):
			return "continue"
		}
	case mdspb.OperatorKind_OPERATOR_KIND_REMOVE_PEER:
		if cs.ConfEpoch != op.ConfEpoch && !has(cs.Peers) && !has(cs.Learners) {
			return "done"
		}
		if reporter == target {
			// The replica to remove leads now: it cannot remove itself;
			// planned again, leadership moves first.
			return "moot"
		}
	}
	if cs.ConfEpoch != op.ConfEpoch {
		return "moot"
	}
	return ""
}

func clonePeers(ps []*commonpb.Peer) []*commonpb.Peer {
	out := make([]*commonpb.Peer, len(ps))
	for i, p := range ps {
		out[i] = proto.CloneOf(p)
	}
	return out
}

func samePeers(a, b []*commonpb.Peer) bool {
	if len(a) != len(b) {
		return false
	}
	ids := map[uint64]bool{}
	for _, p := range a {
		ids[p.ChunkserverId] = true
	}
	for _, p := range b {
		if !ids[p.ChunkserverId] {
			return false
		}
	}
	return true
}

// persistCopysets writes the current cached state of the given copysets and
// deletes the given operators. Writes are serialised and always write the
// newest cached state, so etcd converges to the cache.
func (l *leaderState) persistCopysets(ctx context.Context, copysets, dropOps []uint64) error {
	if len(copysets) == 0 && len(dropOps) == 0 {
		return nil
	}
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	var ops []clientv3.Op
	l.mu.Lock()
	for _, key := range copysets {
		if c := l.mu.copysets[key]; c != nil {
			ops = append(ops, putOp(l.st.k.copyset(c.Id.LogicalPoolId, c.Id.CopysetId), c))
		}
	}
	for _, key := range dropOps {
		if l.mu.operators[key] == nil {
			ops = append(ops, clientv3.OpDelete(l.st.k.operator(uint32(key>>32), uint32(key))))
		}
	}
	l.mu.Unlock()
	for start := 0; start < len(ops); start += maxTxnOps {
		if _, err := l.st.txn(ctx, nil, ops[start:min(start+maxTxnOps, len(ops))]...); err != nil {
			return err
		}
	}
	return nil
}

func (l *leaderState) persistChunkServer(ctx context.Context, rec *mdspb.ChunkServer) error {
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	if _, err := l.st.txn(ctx, nil, putOp(l.st.k.chunkServer(rec.Id), rec)); err != nil {
		return err
	}
	l.mu.Lock()
	if e := l.mu.chunkServers[rec.Id]; e != nil {
		e.rec.Address = rec.Address
	}
	l.mu.Unlock()
	l.log.Info("chunkserver address changed", "chunkserver", rec.Id, "address", rec.Address)
	return nil
}
