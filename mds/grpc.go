package mds

import (
	"context"
	"errors"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds/mdsclient"
)

// leaderInterceptor answers every call on a follower with UNAVAILABLE and a
// NotLeader detail, and turns internal errors into gRPC status codes.
func (s *Server) leaderInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	start := time.Now()
	defer func() {
		method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
		code := strings.ToLower(toSnake(status.Code(err).String()))
		s.metrics.rpcs.WithLabelValues(method, code).Observe(time.Since(start).Seconds())
	}()
	st := s.leader()
	if st == nil {
		return nil, s.notLeader(ctx)
	}
	resp, err = handler(ctx, req)
	if err != nil {
		if errors.Is(err, errNotLeader) {
			return nil, s.notLeader(ctx)
		}
		if _, ok := status.FromError(err); !ok {
			switch {
			case errors.Is(err, context.DeadlineExceeded):
				err = status.Error(codes.DeadlineExceeded, err.Error())
			case errors.Is(err, context.Canceled):
				err = status.Error(codes.Canceled, err.Error())
			default:
				// etcd unreachable or similar: the caller may retry.
				err = status.Error(codes.Unavailable, err.Error())
			}
		}
	}
	return resp, err
}

// toSnake turns a gRPC code name (DeadlineExceeded) into a label value
// (deadline_exceeded).
func toSnake(name string) string {
	var b strings.Builder
	prevLower := false
	for _, r := range name {
		upper := r >= 'A' && r <= 'Z'
		if upper && prevLower {
			b.WriteByte('_')
		}
		prevLower = !upper
		b.WriteRune(r)
	}
	return b.String()
}

func (s *Server) notLeader(ctx context.Context) error {
	lctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	addr, err := s.LeaderAddress(lctx)
	if err != nil || addr == s.advAddr {
		addr = ""
	}
	return mdsclient.NotLeaderError(addr)
}

// withLeader runs a handler against the leader state; it answers
// errNotLeader when this MDS lost the leadership since the interceptor
// checked it.
func withLeader[T any](s *Server, f func(*leaderState) (T, error)) (T, error) {
	st := s.leader()
	if st == nil {
		var zero T
		return zero, errNotLeader
	}
	return f(st)
}

func registerServices(g *grpc.Server, s *Server) {
	mdspb.RegisterTopologyServiceServer(g, topologyService{s: s})
	mdspb.RegisterHeartbeatServiceServer(g, heartbeatService{s: s})
	mdspb.RegisterVolumeServiceServer(g, volumeService{s: s})
	mdspb.RegisterClusterServiceServer(g, clusterService{s: s})
}

type topologyService struct {
	s *Server
	mdspb.UnimplementedTopologyServiceServer
}

func (sv topologyService) RegisterChunkServer(ctx context.Context, r *mdspb.RegisterChunkServerRequest) (*mdspb.RegisterChunkServerResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.RegisterChunkServerResponse, error) {
		return st.registerChunkServer(ctx, r)
	})
}
func (sv topologyService) GetChunkServer(ctx context.Context, r *mdspb.GetChunkServerRequest) (*mdspb.GetChunkServerResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.GetChunkServerResponse, error) { return st.getChunkServer(r) })
}
func (sv topologyService) ListZones(ctx context.Context, r *mdspb.ListZonesRequest) (*mdspb.ListZonesResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListZonesResponse, error) { return st.listZones(), nil })
}
func (sv topologyService) ListServers(ctx context.Context, r *mdspb.ListServersRequest) (*mdspb.ListServersResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListServersResponse, error) { return st.listServers(), nil })
}
func (sv topologyService) ListChunkServers(ctx context.Context, r *mdspb.ListChunkServersRequest) (*mdspb.ListChunkServersResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListChunkServersResponse, error) { return st.listChunkServers(), nil })
}
func (sv topologyService) ListPools(ctx context.Context, r *mdspb.ListPoolsRequest) (*mdspb.ListPoolsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListPoolsResponse, error) { return st.listPools(), nil })
}
func (sv topologyService) CreateLogicalPool(ctx context.Context, r *mdspb.CreateLogicalPoolRequest) (*mdspb.CreateLogicalPoolResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.CreateLogicalPoolResponse, error) { return st.createLogicalPool(ctx, r) })
}
func (sv topologyService) ListCopysets(ctx context.Context, r *mdspb.ListCopysetsRequest) (*mdspb.ListCopysetsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListCopysetsResponse, error) { return st.listCopysets(r) })
}
func (sv topologyService) GetCopysets(ctx context.Context, r *mdspb.GetCopysetsRequest) (*mdspb.GetCopysetsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.GetCopysetsResponse, error) { return st.getCopysets(r) })
}
func (sv topologyService) UpdateChunkServer(ctx context.Context, r *mdspb.UpdateChunkServerRequest) (*mdspb.UpdateChunkServerResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.UpdateChunkServerResponse, error) { return st.updateChunkServer(ctx, r) })
}
func (sv topologyService) DeleteChunkServer(ctx context.Context, r *mdspb.DeleteChunkServerRequest) (*mdspb.DeleteChunkServerResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.DeleteChunkServerResponse, error) { return st.deleteChunkServer(ctx, r) })
}

type heartbeatService struct {
	s *Server
	mdspb.UnimplementedHeartbeatServiceServer
}

func (sv heartbeatService) Heartbeat(ctx context.Context, r *mdspb.HeartbeatRequest) (*mdspb.HeartbeatResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.HeartbeatResponse, error) { return st.heartbeat(ctx, r) })
}

type volumeService struct {
	s *Server
	mdspb.UnimplementedVolumeServiceServer
}

func (sv volumeService) CreateVolume(ctx context.Context, r *mdspb.CreateVolumeRequest) (*mdspb.CreateVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.CreateVolumeResponse, error) { return st.createVolume(ctx, r) })
}
func (sv volumeService) StatVolume(ctx context.Context, r *mdspb.StatVolumeRequest) (*mdspb.StatVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.StatVolumeResponse, error) { return st.statVolume(ctx, r) })
}
func (sv volumeService) ListVolumes(ctx context.Context, r *mdspb.ListVolumesRequest) (*mdspb.ListVolumesResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListVolumesResponse, error) { return st.listVolumes(ctx) })
}
func (sv volumeService) ExtendVolume(ctx context.Context, r *mdspb.ExtendVolumeRequest) (*mdspb.ExtendVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ExtendVolumeResponse, error) { return st.extendVolume(ctx, r) })
}
func (sv volumeService) RenameVolume(ctx context.Context, r *mdspb.RenameVolumeRequest) (*mdspb.RenameVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.RenameVolumeResponse, error) { return st.renameVolume(ctx, r) })
}
func (sv volumeService) DeleteVolume(ctx context.Context, r *mdspb.DeleteVolumeRequest) (*mdspb.DeleteVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.DeleteVolumeResponse, error) { return st.deleteVolume(ctx, r) })
}
func (sv volumeService) RegisterNode(ctx context.Context, r *mdspb.RegisterNodeRequest) (*mdspb.RegisterNodeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.RegisterNodeResponse, error) { return st.registerNode(ctx, r) })
}
func (sv volumeService) ListNodes(ctx context.Context, r *mdspb.ListNodesRequest) (*mdspb.ListNodesResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListNodesResponse, error) { return st.listNodes(ctx) })
}
func (sv volumeService) PublishVolume(ctx context.Context, r *mdspb.PublishVolumeRequest) (*mdspb.PublishVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.PublishVolumeResponse, error) { return st.publishVolume(ctx, r) })
}
func (sv volumeService) UnpublishVolume(ctx context.Context, r *mdspb.UnpublishVolumeRequest) (*mdspb.UnpublishVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.UnpublishVolumeResponse, error) { return st.unpublishVolume(ctx, r) })
}
func (sv volumeService) OpenVolume(ctx context.Context, r *mdspb.OpenVolumeRequest) (*mdspb.OpenVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.OpenVolumeResponse, error) { return st.openVolume(ctx, r) })
}
func (sv volumeService) CreateSnapshot(ctx context.Context, r *mdspb.CreateSnapshotRequest) (*mdspb.CreateSnapshotResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.CreateSnapshotResponse, error) { return st.createSnapshot(ctx, r) })
}
func (sv volumeService) ListSnapshots(ctx context.Context, r *mdspb.ListSnapshotsRequest) (*mdspb.ListSnapshotsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListSnapshotsResponse, error) { return st.listSnapshots(ctx, r) })
}
func (sv volumeService) DeleteSnapshot(ctx context.Context, r *mdspb.DeleteSnapshotRequest) (*mdspb.DeleteSnapshotResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.DeleteSnapshotResponse, error) { return st.deleteSnapshot(ctx, r) })
}
func (sv volumeService) TrashVolume(ctx context.Context, r *mdspb.TrashVolumeRequest) (*mdspb.TrashVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.TrashVolumeResponse, error) { return st.trashVolume(ctx, r) })
}
func (sv volumeService) RestoreVolume(ctx context.Context, r *mdspb.RestoreVolumeRequest) (*mdspb.RestoreVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.RestoreVolumeResponse, error) { return st.restoreVolume(ctx, r) })
}
func (sv volumeService) FlattenVolume(ctx context.Context, r *mdspb.FlattenVolumeRequest) (*mdspb.FlattenVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.FlattenVolumeResponse, error) { return st.flattenVolume(ctx, r) })
}
func (sv volumeService) RefreshSession(ctx context.Context, r *mdspb.RefreshSessionRequest) (*mdspb.RefreshSessionResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.RefreshSessionResponse, error) { return st.refreshSession(ctx, r) })
}
func (sv volumeService) CloseVolume(ctx context.Context, r *mdspb.CloseVolumeRequest) (*mdspb.CloseVolumeResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.CloseVolumeResponse, error) { return st.closeVolume(ctx, r) })
}
func (sv volumeService) ListSessions(ctx context.Context, r *mdspb.ListSessionsRequest) (*mdspb.ListSessionsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListSessionsResponse, error) { return st.listSessions(ctx, r) })
}
func (sv volumeService) GetSegment(ctx context.Context, r *mdspb.GetSegmentRequest) (*mdspb.GetSegmentResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.GetSegmentResponse, error) { return st.getSegment(ctx, r) })
}
func (sv volumeService) ListSegments(ctx context.Context, r *mdspb.ListSegmentsRequest) (*mdspb.ListSegmentsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListSegmentsResponse, error) { return st.listSegments(ctx, r) })
}

type clusterService struct {
	s *Server
	mdspb.UnimplementedClusterServiceServer
}

func (sv clusterService) GetClusterStatus(ctx context.Context, r *mdspb.GetClusterStatusRequest) (*mdspb.GetClusterStatusResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.GetClusterStatusResponse, error) { return st.clusterStatus(ctx) })
}
func (sv clusterService) TransferLeader(ctx context.Context, r *mdspb.TransferLeaderRequest) (*mdspb.TransferLeaderResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.TransferLeaderResponse, error) { return st.transferLeader(ctx, r) })
}
func (sv clusterService) ListOperators(ctx context.Context, r *mdspb.ListOperatorsRequest) (*mdspb.ListOperatorsResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.ListOperatorsResponse, error) { return st.listOperators(), nil })
}
func (sv clusterService) GetScheduleStatus(ctx context.Context, r *mdspb.GetScheduleStatusRequest) (*mdspb.GetScheduleStatusResponse, error) {
	return withLeader(sv.s, func(st *leaderState) (*mdspb.GetScheduleStatusResponse, error) {
		return st.scheduleStatus(time.Now()), nil
	})
}
