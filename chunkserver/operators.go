package chunkserver

import (
	"context"
	"errors"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/copyset"
)

// operatorService takes operators the MDS pushes as soon as it queued them
// (mdspb.OperatorService); heartbeat answers carry the same ones until they
// take effect.
type operatorService struct {
	mdspb.UnimplementedOperatorServiceServer
	s *Server
}

// StartOperators starts each operator whose copyset this chunkserver leads.
func (o operatorService) StartOperators(_ context.Context, req *mdspb.StartOperatorsRequest) (*mdspb.StartOperatorsResponse, error) {
	for _, op := range req.GetOperators() {
		o.s.startOperator(op)
	}
	return &mdspb.StartOperatorsResponse{}, nil
}

// startOperator carries out an MDS operator in the background, one per
// copyset at a time; the MDS repeats it until the copyset reports it done.
func (s *Server) startOperator(op *mdspb.Operator) {
	ref := op.GetCopyset()
	id := copyset.MakeGroupID(ref.GetLogicalPoolId(), ref.GetCopysetId())
	c, err := s.engine.Get(id)
	if err != nil || !c.IsLeader() {
		return
	}
	s.opsMu.Lock()
	if s.opsActive[id] {
		s.opsMu.Unlock()
		return
	}
	s.opsActive[id] = true
	s.opsMu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		// Last: report at once, so that the MDS learns the step is done
		// and answers with the next; the copyset is free for it by then.
		defer s.reportSoon()
		defer func() {
			s.opsMu.Lock()
			delete(s.opsActive, id)
			s.opsMu.Unlock()
		}()
		// A transfer is done in an election timeout or two; a stuck one
		// must not hold the copyset from the next operator for long.
		timeout := 2 * time.Minute
		if op.GetKind() == mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER {
			timeout = 15 * time.Second
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		go func() {
			select {
			case <-s.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		target := op.GetTarget().GetChunkserverId()
		s.res.hint(target, op.GetTarget().GetAddress())
		log := s.log.With("copyset", id.String(), "operator", op.GetKind().String(), "target", target, "conf_epoch", op.GetConfEpoch())
		var err error
		switch op.GetKind() {
		case mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER:
			err = c.TransferLeader(ctx, target, op.GetConfEpoch())
		case mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER:
			// The MDS created the empty replica on the target before it
			// handed out the operator.
			err = c.AddPeer(ctx, target, op.GetConfEpoch())
		case mdspb.OperatorKind_OPERATOR_KIND_REMOVE_PEER:
			err = c.RemovePeer(ctx, target, op.GetConfEpoch())
		default:
			log.Warn("unknown operator ignored")
			return
		}
		switch {
		case errors.Is(err, copyset.ErrStaleEpoch):
			log.Info("operator refused: the copyset's configuration changed since the MDS computed it", "err", err)
		case err != nil:
			log.Warn("operator failed", "err", err)
		default:
			log.Info("operator done")
		}
	}()
}
