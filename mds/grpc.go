package mds

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds/mdsclient"
)

type leaderKey struct{}

// leaderInterceptor answers every call on a follower with UNAVAILABLE and a
// NotLeader detail, hands the leader state to handlers, and turns internal
// errors into gRPC status codes.
func (s *Server) leaderInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	st := s.leader()
	if st == nil {
		return nil, s.notLeader(ctx)
	}
	resp, err := handler(context.WithValue(ctx, leaderKey{}, st), req)
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

func (s *Server) notLeader(ctx context.Context) error {
	lctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	addr, err := s.LeaderAddress(lctx)
	if err != nil || addr == s.advAddr {
		addr = ""
	}
	return mdsclient.NotLeaderError(addr)
}

func leaderFrom(ctx context.Context) *leaderState { return ctx.Value(leaderKey{}).(*leaderState) }

func registerServices(g *grpc.Server, s *Server) {
	mdspb.RegisterTopologyServiceServer(g, topologyService{})
	mdspb.RegisterHeartbeatServiceServer(g, heartbeatService{})
	mdspb.RegisterVolumeServiceServer(g, volumeService{})
	mdspb.RegisterClusterServiceServer(g, clusterService{})
}

type topologyService struct {
	mdspb.UnimplementedTopologyServiceServer
}

func (topologyService) RegisterChunkServer(ctx context.Context, r *mdspb.RegisterChunkServerRequest) (*mdspb.RegisterChunkServerResponse, error) {
	return leaderFrom(ctx).registerChunkServer(ctx, r)
}
func (topologyService) GetChunkServer(ctx context.Context, r *mdspb.GetChunkServerRequest) (*mdspb.GetChunkServerResponse, error) {
	return leaderFrom(ctx).getChunkServer(r)
}
func (topologyService) ListZones(ctx context.Context, r *mdspb.ListZonesRequest) (*mdspb.ListZonesResponse, error) {
	return leaderFrom(ctx).listZones(), nil
}
func (topologyService) ListServers(ctx context.Context, r *mdspb.ListServersRequest) (*mdspb.ListServersResponse, error) {
	return leaderFrom(ctx).listServers(), nil
}
func (topologyService) ListChunkServers(ctx context.Context, r *mdspb.ListChunkServersRequest) (*mdspb.ListChunkServersResponse, error) {
	return leaderFrom(ctx).listChunkServers(), nil
}
func (topologyService) ListPools(ctx context.Context, r *mdspb.ListPoolsRequest) (*mdspb.ListPoolsResponse, error) {
	return leaderFrom(ctx).listPools(), nil
}
func (topologyService) CreateLogicalPool(ctx context.Context, r *mdspb.CreateLogicalPoolRequest) (*mdspb.CreateLogicalPoolResponse, error) {
	return leaderFrom(ctx).createLogicalPool(ctx, r)
}
func (topologyService) ListCopysets(ctx context.Context, r *mdspb.ListCopysetsRequest) (*mdspb.ListCopysetsResponse, error) {
	return leaderFrom(ctx).listCopysets(r)
}
func (topologyService) GetCopysets(ctx context.Context, r *mdspb.GetCopysetsRequest) (*mdspb.GetCopysetsResponse, error) {
	return leaderFrom(ctx).getCopysets(r)
}

type heartbeatService struct {
	mdspb.UnimplementedHeartbeatServiceServer
}

func (heartbeatService) Heartbeat(ctx context.Context, r *mdspb.HeartbeatRequest) (*mdspb.HeartbeatResponse, error) {
	return leaderFrom(ctx).heartbeat(ctx, r)
}

type volumeService struct {
	mdspb.UnimplementedVolumeServiceServer
}

func (volumeService) CreateVolume(ctx context.Context, r *mdspb.CreateVolumeRequest) (*mdspb.CreateVolumeResponse, error) {
	return leaderFrom(ctx).createVolume(ctx, r)
}
func (volumeService) StatVolume(ctx context.Context, r *mdspb.StatVolumeRequest) (*mdspb.StatVolumeResponse, error) {
	return leaderFrom(ctx).statVolume(ctx, r)
}
func (volumeService) ListVolumes(ctx context.Context, r *mdspb.ListVolumesRequest) (*mdspb.ListVolumesResponse, error) {
	return leaderFrom(ctx).listVolumes(ctx)
}
func (volumeService) ExtendVolume(ctx context.Context, r *mdspb.ExtendVolumeRequest) (*mdspb.ExtendVolumeResponse, error) {
	return leaderFrom(ctx).extendVolume(ctx, r)
}
func (volumeService) RenameVolume(ctx context.Context, r *mdspb.RenameVolumeRequest) (*mdspb.RenameVolumeResponse, error) {
	return leaderFrom(ctx).renameVolume(ctx, r)
}
func (volumeService) DeleteVolume(ctx context.Context, r *mdspb.DeleteVolumeRequest) (*mdspb.DeleteVolumeResponse, error) {
	return leaderFrom(ctx).deleteVolume(ctx, r)
}
func (volumeService) OpenVolume(ctx context.Context, r *mdspb.OpenVolumeRequest) (*mdspb.OpenVolumeResponse, error) {
	return leaderFrom(ctx).openVolume(ctx, r)
}
func (volumeService) RefreshSession(ctx context.Context, r *mdspb.RefreshSessionRequest) (*mdspb.RefreshSessionResponse, error) {
	return leaderFrom(ctx).refreshSession(ctx, r)
}
func (volumeService) CloseVolume(ctx context.Context, r *mdspb.CloseVolumeRequest) (*mdspb.CloseVolumeResponse, error) {
	return leaderFrom(ctx).closeVolume(ctx, r)
}
func (volumeService) ListSessions(ctx context.Context, r *mdspb.ListSessionsRequest) (*mdspb.ListSessionsResponse, error) {
	return leaderFrom(ctx).listSessions(ctx, r)
}
func (volumeService) GetSegment(ctx context.Context, r *mdspb.GetSegmentRequest) (*mdspb.GetSegmentResponse, error) {
	return leaderFrom(ctx).getSegment(ctx, r)
}
func (volumeService) ListSegments(ctx context.Context, r *mdspb.ListSegmentsRequest) (*mdspb.ListSegmentsResponse, error) {
	return leaderFrom(ctx).listSegments(ctx, r)
}

type clusterService struct {
	mdspb.UnimplementedClusterServiceServer
}

func (clusterService) GetClusterStatus(ctx context.Context, r *mdspb.GetClusterStatusRequest) (*mdspb.GetClusterStatusResponse, error) {
	return leaderFrom(ctx).clusterStatus(ctx)
}
func (clusterService) TransferLeader(ctx context.Context, r *mdspb.TransferLeaderRequest) (*mdspb.TransferLeaderResponse, error) {
	return leaderFrom(ctx).transferLeader(ctx, r)
}
func (clusterService) ListOperators(ctx context.Context, r *mdspb.ListOperatorsRequest) (*mdspb.ListOperatorsResponse, error) {
	return leaderFrom(ctx).listOperators(), nil
}
