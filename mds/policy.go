package mds

import (
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
)

// Policy is who may call what on the MDS when it runs with TLS. Reading
// the topology, volumes and status is open to every role; registering and
// heartbeats are for chunkservers; volume sessions for clients (and
// operators, who end stale ones); changing the topology, creating,
// resizing, deleting and publishing volumes and moving leaders for
// operators (cairn-ops, the CSI controller).
var Policy = &certs.Policy{
	Default: certs.Roles,
	Methods: map[string][]certs.Role{
		mdspb.TopologyService_RegisterChunkServer_FullMethodName: {certs.RoleChunkServer},
		mdspb.HeartbeatService_Heartbeat_FullMethodName:          {certs.RoleChunkServer},

		mdspb.VolumeService_OpenVolume_FullMethodName:     {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_RefreshSession_FullMethodName: {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_CloseVolume_FullMethodName:    {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_GetSegment_FullMethodName:     {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_RegisterNode_FullMethodName:   {certs.RoleClient, certs.RoleOperator},

		mdspb.TopologyService_CreateLogicalPool_FullMethodName: {certs.RoleOperator},
		mdspb.TopologyService_UpdateChunkServer_FullMethodName: {certs.RoleOperator},
		mdspb.TopologyService_DeleteChunkServer_FullMethodName: {certs.RoleOperator},
		mdspb.VolumeService_CreateVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_ExtendVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_RenameVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_DeleteVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_PublishVolume_FullMethodName:       {certs.RoleOperator},
		mdspb.VolumeService_UnpublishVolume_FullMethodName:     {certs.RoleOperator},
		mdspb.ClusterService_TransferLeader_FullMethodName:     {certs.RoleOperator},
	},
}
