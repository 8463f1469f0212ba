package mds

import (
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
)

// Policy is who may call what on the MDS when it runs with TLS. Reading
// the topology, volumes and status is open to every role; registering and
// heartbeats are for chunkservers; volume sessions for clients (and
// operators, who end stale ones); changing the topology, creating,
// resizing, deleting and publishing volumes, listing sessions and moving
// leaders for operators (cairn-ops, the CSI controller). A method not
// listed is refused: a new one must be given its roles here
// (TestPolicyCoversEveryMethod).
var Policy = &certs.Policy{
	Methods: map[string][]certs.Role{
		mdspb.TopologyService_GetChunkServer_FullMethodName:   certs.Roles,
		mdspb.TopologyService_ListZones_FullMethodName:        certs.Roles,
		mdspb.TopologyService_ListServers_FullMethodName:      certs.Roles,
		mdspb.TopologyService_ListChunkServers_FullMethodName: certs.Roles,
		mdspb.TopologyService_ListPools_FullMethodName:        certs.Roles,
		mdspb.TopologyService_ListCopysets_FullMethodName:     certs.Roles,
		mdspb.TopologyService_GetCopysets_FullMethodName:      certs.Roles,
		mdspb.VolumeService_StatVolume_FullMethodName:         certs.Roles,
		mdspb.VolumeService_ListVolumes_FullMethodName:        certs.Roles,
		mdspb.VolumeService_ListSnapshots_FullMethodName:      certs.Roles,
		mdspb.ClusterService_GetClusterStatus_FullMethodName:  certs.Roles,
		mdspb.ClusterService_ListOperators_FullMethodName:     certs.Roles,
		mdspb.ClusterService_GetScheduleStatus_FullMethodName: certs.Roles,

		mdspb.TopologyService_RegisterChunkServer_FullMethodName: {certs.RoleChunkServer},
		mdspb.HeartbeatService_Heartbeat_FullMethodName:          {certs.RoleChunkServer},

		mdspb.VolumeService_OpenVolume_FullMethodName:     {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_RefreshSession_FullMethodName: {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_CloseVolume_FullMethodName:    {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_GetSegment_FullMethodName:     {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_ListSegments_FullMethodName:   {certs.RoleClient, certs.RoleOperator},
		mdspb.VolumeService_RegisterNode_FullMethodName:   {certs.RoleClient, certs.RoleOperator},

		mdspb.TopologyService_CreateLogicalPool_FullMethodName: {certs.RoleOperator},
		mdspb.TopologyService_UpdateChunkServer_FullMethodName: {certs.RoleOperator},
		mdspb.TopologyService_DeleteChunkServer_FullMethodName: {certs.RoleOperator},
		mdspb.VolumeService_CreateVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_ExtendVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_RenameVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_DeleteVolume_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_CreateSnapshot_FullMethodName:      {certs.RoleOperator},
		mdspb.VolumeService_DeleteSnapshot_FullMethodName:      {certs.RoleOperator},
		mdspb.VolumeService_FlattenVolume_FullMethodName:       {certs.RoleOperator},
		mdspb.VolumeService_TrashVolume_FullMethodName:         {certs.RoleOperator},
		mdspb.VolumeService_RestoreVolume_FullMethodName:       {certs.RoleOperator},
		mdspb.VolumeService_PublishVolume_FullMethodName:       {certs.RoleOperator},
		mdspb.VolumeService_UnpublishVolume_FullMethodName:     {certs.RoleOperator},
		mdspb.VolumeService_ListSessions_FullMethodName:        {certs.RoleOperator},
		mdspb.VolumeService_ListNodes_FullMethodName:           {certs.RoleOperator},
		mdspb.ClusterService_TransferLeader_FullMethodName:     {certs.RoleOperator},
	},
}
