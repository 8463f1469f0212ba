package mds

import (
	"context"
	"slices"
	"sort"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
)

// manualHold is how long the balance scheduler leaves a copyset alone after
// an operator chose its leader by hand, so that it does not move the
// leadership straight back.
const manualHold = 30 * time.Minute

// transferLeader queues a transfer-leader operator. The copyset's leader
// receives it with its next heartbeat responses until its report shows the
// transfer done or the configuration moved on.
func (l *leaderState) transferLeader(ctx context.Context, r *mdspb.TransferLeaderRequest) (*mdspb.TransferLeaderResponse, error) {
	if r.Copyset == nil {
		return nil, status.Error(codes.InvalidArgument, "no copyset given")
	}
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	key := r.Copyset.Key()
	l.mu.Lock()
	c := l.mu.copysets[key]
	var op *mdspb.Operator
	err := func() error {
		if c == nil {
			return status.Errorf(codes.NotFound, "copyset %s does not exist", r.Copyset.Name())
		}
		i := slices.IndexFunc(c.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == r.ToChunkserverId })
		switch {
		case i < 0:
			return status.Errorf(codes.InvalidArgument, "chunkserver %d is not a member of copyset %s", r.ToChunkserverId, r.Copyset.Name())
		case c.LeaderId == 0:
			return status.Errorf(codes.FailedPrecondition, "copyset %s has no leader reported yet", r.Copyset.Name())
		case c.LeaderId == r.ToChunkserverId:
			return status.Errorf(codes.FailedPrecondition, "chunkserver %d already leads copyset %s", r.ToChunkserverId, r.Copyset.Name())
		case l.mu.operators[key] != nil:
			return status.Errorf(codes.FailedPrecondition, "copyset %s already has a pending operator", r.Copyset.Name())
		}
		target := proto.CloneOf(c.Peers[i])
		if e := l.mu.chunkServers[target.ChunkserverId]; e != nil {
			target.Address = e.rec.Address
		}
		op = &mdspb.Operator{
			Copyset: proto.CloneOf(c.Id), Kind: mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER,
			ConfEpoch: c.ConfEpoch, Target: target, Reason: "manual", CreatedUnix: time.Now().Unix(),
		}
		// Queued at once, so that no scheduler takes the copyset while
		// the operator is written.
		l.mu.operators[key] = op
		l.mu.unsaved[op] = true
		l.mu.pinned[key] = time.Now().Add(manualHold)
		return nil
	}()
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if _, err := l.st.txn(ctx, nil, putOp(l.st.k.operator(op.Copyset.LogicalPoolId, op.Copyset.CopysetId), op)); err != nil {
		l.mu.Lock()
		if l.mu.operators[key] == op {
			delete(l.mu.operators, key)
		}
		delete(l.mu.unsaved, op)
		delete(l.mu.pinned, key)
		l.mu.Unlock()
		return nil, err
	}
	l.mu.Lock()
	delete(l.mu.unsaved, op)
	l.mu.Unlock()
	l.pushOperators([]*mdspb.Operator{op})
	l.s.metrics.operatorsStarted.WithLabelValues(op.Kind.Label(), op.Reason).Inc()
	l.log.Info("transfer-leader operator queued", "copyset", op.Copyset.Name(),
		"to", r.ToChunkserverId, "conf_epoch", op.ConfEpoch)
	return &mdspb.TransferLeaderResponse{Operator: proto.CloneOf(op)}, nil
}

func (l *leaderState) listOperators() *mdspb.ListOperatorsResponse {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := &mdspb.ListOperatorsResponse{}
	for _, op := range l.mu.operators {
		if !l.mu.unsaved[op] {
			out.Operators = append(out.Operators, proto.CloneOf(op))
		}
	}
	sort.Slice(out.Operators, func(i, j int) bool { return out.Operators[i].Copyset.Key() < out.Operators[j].Copyset.Key() })
	return out
}
