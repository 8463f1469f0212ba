package chunkserver

import (
	"context"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/internal/certs"
)

// Policy is who may call what on a chunkserver when it runs with TLS:
// chunk IO for clients and operators (under a volume epoch, as without
// TLS); epochs, copyset creation and operators for the MDS (which also
// creates the empty replica an add operator fills); Raft traffic and
// snapshots for chunkservers only. Anything else is refused.
var Policy = &certs.Policy{
	Methods: map[string][]certs.Role{
		chunkpb.ChunkService_WriteChunk_FullMethodName:   {certs.RoleClient, certs.RoleOperator},
		chunkpb.ChunkService_ReadChunk_FullMethodName:    {certs.RoleClient, certs.RoleOperator},
		chunkpb.ChunkService_DeleteChunk_FullMethodName:  {certs.RoleClient, certs.RoleOperator, certs.RoleMDS},
		chunkpb.ChunkService_TrimChunk_FullMethodName:    {certs.RoleMDS},
		chunkpb.ChunkService_GetChunkInfo_FullMethodName: {certs.RoleClient, certs.RoleOperator, certs.RoleMDS},
		chunkpb.ChunkService_GetChunkHash_FullMethodName: {certs.RoleClient, certs.RoleOperator, certs.RoleMDS},
		chunkpb.ChunkService_ChunksExist_FullMethodName:  {certs.RoleClient, certs.RoleOperator},
		chunkpb.ChunkService_UpdateEpoch_FullMethodName:  {certs.RoleMDS},

		copysetpb.CopysetService_CreateCopysets_FullMethodName:   {certs.RoleMDS},
		copysetpb.CopysetService_GetCopysetStatus_FullMethodName: {certs.RoleMDS, certs.RoleOperator, certs.RoleChunkServer},
		mdspb.OperatorService_StartOperators_FullMethodName:      {certs.RoleMDS},

		transportpb.RaftTransport_InstallSnapshot_FullMethodName: {certs.RoleChunkServer},
		transportpb.WireRaftBatchName:                            {certs.RoleChunkServer},
	},
}

// authorizeSender binds a Raft sender to its certificate (with TLS only):
// a batch or snapshot from chunkserver N is taken only from a caller whose
// certificate names the host N registered with the MDS, so a chunkserver
// cannot speak for another on another host. Chunkservers that share a host
// (the playground) share its name. When the address cannot be learned (the
// MDS is away and it is not cached), the batch is taken: Raft must go on
// without the MDS, and the caller holds a chunkserver certificate. A
// chunkserver the MDS does not know is refused.
func (s *Server) authorizeSender() func(ctx context.Context, from uint64) error {
	if s.cfg.TLS == nil {
		return nil
	}
	return func(ctx context.Context, from uint64) error {
		p, err := certs.PeerOf(ctx)
		if err != nil {
			return err
		}
		addr, ok := s.res.fresh(from)
		if !ok {
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			addr, err = s.res.Resolve(rctx, from)
			switch {
			case status.Code(err) == codes.NotFound:
				return fmt.Errorf("%s speaks for chunkserver %d, which the MDS does not know", p, from)
			case err != nil:
				return nil
			}
		}
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		if err := certs.VerifyHost(ctx, p, host); err != nil {
			return fmt.Errorf("%s may not speak for chunkserver %d at %s: %w", p, from, addr, err)
		}
		return nil
	}
}

// membersOracle is the copysets' view of membership beyond their own (with
// TLS only, where a sender's id is bound to its certificate): see
// memberCache.
func (s *Server) membersOracle() func(copyset.GroupID, uint64) copyset.MemberAnswer {
	if s.cfg.TLS == nil {
		return nil
	}
	return newMemberCache(s.mds.Topology()).answer
}
