package chunkserver

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/copyset"
)

// copysetService lets the MDS create copysets here and tools inspect them.
type copysetService struct {
	copysetpb.UnimplementedCopysetServiceServer
	s *Server
}

func (cs *copysetService) CreateCopysets(ctx context.Context, req *copysetpb.CreateCopysetsRequest) (*copysetpb.CreateCopysetsResponse, error) {
	s := cs.s
	var created uint32
	for _, spec := range req.GetCopysets() {
		ref := spec.GetCopyset()
		if ref == nil {
			return nil, status.Error(codes.InvalidArgument, "copyset spec without a copyset id")
		}
		id := copyset.MakeGroupID(ref.GetLogicalPoolId(), ref.GetCopysetId())
		var peers []uint64
		for _, p := range spec.GetPeers() {
			peers = append(peers, p.GetChunkserverId())
			s.res.hint(p.GetChunkserverId(), p.GetAddress())
		}
		if len(peers) > 0 && !contains(peers, s.id.ChunkServerID) {
			return nil, status.Errorf(codes.InvalidArgument, "copyset %s: members %v do not include chunkserver %d", id, peers, s.id.ChunkServerID)
		}
		old, lookupErr := s.engine.Get(id)
		if e := spec.GetAddConfEpoch(); lookupErr == nil && len(peers) == 0 && e != 0 && old.Broken() != nil &&
			old.ConfEpoch() >= e && contains(old.ConfState().GetVoters(), s.id.ChunkServerID) {
			// A voter replaced by an empty replica would forget its log
			// and its vote; it is rebuilt by removing it first.
			return nil, status.Errorf(codes.FailedPrecondition,
				"copyset %s: the broken replica here is a voter at configuration epoch %d, not before the add's %d: not replaced by an empty one",
				id, old.ConfEpoch(), e)
		}
		err := s.engine.Create(id, peers)
		switch {
		case errors.Is(err, copyset.ErrExists):
			return nil, status.Errorf(codes.AlreadyExists, "%v", err)
		case err != nil:
			return nil, status.Errorf(codes.Internal, "create copyset %s: %v", id, err)
		}
		if lookupErr != nil { // it did not exist before
			created++
		}
	}
	if created > 0 {
		s.log.Info("copysets created", "count", created, "asked", len(req.GetCopysets()))
	}
	return &copysetpb.CreateCopysetsResponse{Created: created}, nil
}

func contains(ids []uint64, id uint64) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

func (cs *copysetService) GetCopysetStatus(ctx context.Context, req *copysetpb.GetCopysetStatusRequest) (*copysetpb.GetCopysetStatusResponse, error) {
	s := cs.s
	resp := &copysetpb.GetCopysetStatusResponse{}
	var list []*copyset.Copyset
	if len(req.GetCopysets()) == 0 {
		list = s.engine.List()
	} else {
		for _, ref := range req.GetCopysets() {
			c, err := s.engine.Get(copyset.MakeGroupID(ref.GetLogicalPoolId(), ref.GetCopysetId()))
			if err != nil {
				resp.Missing = append(resp.Missing, ref)
				continue
			}
			list = append(list, c)
		}
	}
	for _, c := range list {
		st, err := c.Status(ctx)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "status of copyset %s: %v", c.ID(), err)
		}
		resp.Copysets = append(resp.Copysets, s.statusProto(st))
	}
	return resp, nil
}

// statusProto converts a copyset status for the wire.
func (s *Server) statusProto(st copyset.Status) *copysetpb.CopysetStatus {
	out := &copysetpb.CopysetStatus{
		Copyset:            &commonpb.CopysetRef{LogicalPoolId: st.ID.Pool(), CopysetId: st.ID.Copyset()},
		ChunkserverId:      st.Node,
		Role:               roleProto(st.Role),
		LeaderId:           st.Leader,
		ConfEpoch:          st.ConfEpoch,
		Term:               st.Term,
		CommitIndex:        st.Commit,
		AppliedIndex:       st.Applied,
		LastLogIndex:       st.LastIndex,
		FirstLogIndex:      st.FirstIndex,
		InstallingSnapshot: st.InstallingSnapshot,
		ChunkCount:         uint64(st.Chunks),
		Broken:             st.Broken,
	}
	for _, v := range st.Voters {
		out.Peers = append(out.Peers, &commonpb.Peer{ChunkserverId: v, Address: s.res.cached(v)})
	}
	for _, l := range st.Learners {
		out.Learners = append(out.Learners, &commonpb.Peer{ChunkserverId: l, Address: s.res.cached(l)})
	}
	for _, p := range st.Progress {
		out.Progress = append(out.Progress, &copysetpb.PeerProgress{
			ChunkserverId: p.Node, MatchIndex: p.Match, State: progressState(p.State), RecentActive: p.RecentActive, Learner: p.Learner,
			HeardMsAgo: uint64(p.Silent / time.Millisecond),
		})
	}
	if st.Pending != nil {
		kind := copysetpb.ConfChangeKind_CONF_CHANGE_ADD_PEER
		if st.Pending.Kind == "remove" {
			kind = copysetpb.ConfChangeKind_CONF_CHANGE_REMOVE_PEER
		}
		out.Pending = &copysetpb.PendingConfChange{Kind: kind, ChunkserverId: st.Pending.Node}
	}
	return out
}

func progressState(s string) string {
	switch s {
	case "StateProbe":
		return "probe"
	case "StateReplicate":
		return "replicate"
	case "StateSnapshot":
		return "snapshot"
	}
	return s
}

func roleProto(r copyset.Role) copysetpb.Role {
	switch r {
	case copyset.RoleLeader:
		return copysetpb.Role_ROLE_LEADER
	case copyset.RoleCandidate:
		return copysetpb.Role_ROLE_CANDIDATE
	case copyset.RolePreCandidate:
		return copysetpb.Role_ROLE_PRE_CANDIDATE
	case copyset.RoleLearner:
		return copysetpb.Role_ROLE_LEARNER
	default:
		return copysetpb.Role_ROLE_FOLLOWER
	}
}
