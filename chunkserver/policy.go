package chunkserver

import (
	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/internal/certs"
)

// Policy is who may call what on a chunkserver when it runs with TLS:
// chunk IO for clients and operators (under a volume epoch, as without
// TLS); epochs, copyset creation and operators for the MDS (a copyset's
// leader also creates the replica it is about to add); Raft traffic and
// snapshots for chunkservers only. Anything else is refused.
var Policy = &certs.Policy{
	Methods: map[string][]certs.Role{
		chunkpb.ChunkService_WriteChunk_FullMethodName:   {certs.RoleClient, certs.RoleOperator},
		chunkpb.ChunkService_ReadChunk_FullMethodName:    {certs.RoleClient, certs.RoleOperator},
		chunkpb.ChunkService_DeleteChunk_FullMethodName:  {certs.RoleClient, certs.RoleOperator, certs.RoleMDS},
		chunkpb.ChunkService_GetChunkInfo_FullMethodName: {certs.RoleClient, certs.RoleOperator, certs.RoleMDS},
		chunkpb.ChunkService_GetChunkHash_FullMethodName: {certs.RoleClient, certs.RoleOperator, certs.RoleMDS},
		chunkpb.ChunkService_UpdateEpoch_FullMethodName:  {certs.RoleMDS},

		copysetpb.CopysetService_CreateCopysets_FullMethodName:   {certs.RoleMDS, certs.RoleChunkServer},
		copysetpb.CopysetService_GetCopysetStatus_FullMethodName: {certs.RoleMDS, certs.RoleOperator, certs.RoleChunkServer},
		mdspb.OperatorService_StartOperators_FullMethodName:      {certs.RoleMDS},

		transportpb.RaftTransport_InstallSnapshot_FullMethodName: {certs.RoleChunkServer},
		transportpb.WireRaftBatchName:                            {certs.RoleChunkServer},
	},
}
