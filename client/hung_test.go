package client_test

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/client"
	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/test/cluster"
)

// heartbeatsCut fails a chunkserver's heartbeats to the MDS while cut is
// set.
func heartbeatsCut(cut *atomic.Bool) func(context.Context, func(context.Context) (*mdspb.HeartbeatResponse, error)) (*mdspb.HeartbeatResponse, error) {
	return func(ctx context.Context, call func(context.Context) (*mdspb.HeartbeatResponse, error)) (*mdspb.HeartbeatResponse, error) {
		if cut.Load() {
			return nil, status.Error(codes.Unavailable, "test: heartbeats cut")
		}
		return call(ctx)
	}
}

// TestHungLeaderIsPassedOver: a leader that hangs (its requests get no
// answer, its Raft traffic stops: a paused process) loses its copyset to
// the other members, while the MDS still names it leader (it learns leaders
// from heartbeats, cut here). A write must go to the other members after
// one attempt timeout and follow them to the new leader, not back to the
// hung one with ever longer attempts.
func TestHungLeaderIsPassedOver(t *testing.T) {
	faults := transport.NewFaults(1)
	var frozen atomic.Bool
	hung := atomic.Int64{}
	hung.Store(-1)
	release := make(chan struct{})
	defer close(release)
	c := cluster.Start(t, cluster.Options{Faults: faults, EpochLease: time.Minute, Tune: func(i int, cfg *chunkserver.Config) {
		cfg.TestingKnobs = chunkserver.TestingKnobs{
			Faults:             cfg.TestingKnobs.Faults, // the cluster's network faults
			InterceptHeartbeat: heartbeatsCut(&frozen),
			UnaryInterceptor: func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				if hung.Load() == int64(i) {
					<-release
				}
				return h(ctx, req)
			},
		}
	}})
	createVolume(t, c, "hang", seg)
	v := open(t, c, "hang", client.Options{})
	if _, err := v.WriteAt(ctx, bytes.Repeat([]byte("a"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	segResp, err := c.Conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "hang", Offset: 0})
	if err != nil {
		t.Fatal(err)
	}
	ref := segResp.GetSegment().GetChunks()[0].GetCopyset()
	addr, err := c.ChunkClient().Leader(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	leader := -1
	for i, cs := range c.ChunkServers() {
		if cs != nil && cs.Addr() == addr {
			leader = i
		}
	}
	if leader < 0 {
		t.Fatalf("no chunkserver at %s", addr)
	}
	frozen.Store(true)
	hung.Store(int64(leader))
	faults.Isolate(c.ChunkServer(leader).ID())
	defer faults.Heal()

	// The hung leader keeps the write's first attempt for its timeout
	// (1.5 s); going back to it would cost 3 s, 6 s and 10 s more.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	data := bytes.Repeat([]byte("b"), 4096)
	if _, err := v.WriteAt(wctx, data, 0); err != nil {
		t.Fatalf("write while the leader hangs: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := v.ReadAt(wctx, got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read while the old leader hangs: %v", err)
	}
}

// TestNoSpaceIsReportedThroughOtherFailures: a write that met a full pool
// and then only transient failures until its retry timeout fails with
// ErrNoSpace, the cause, not ErrTimeout.
func TestNoSpaceIsReportedThroughOtherFailures(t *testing.T) {
	var calls atomic.Int64
	var full atomic.Bool
	c := cluster.Start(t, cluster.Options{Tune: func(i int, cfg *chunkserver.Config) {
		cfg.TestingKnobs.UnaryInterceptor = func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if _, ok := req.(*chunkpb.WriteChunkRequest); ok && full.Load() {
				if calls.Add(1) == 1 {
					return &chunkpb.WriteChunkResponse{Status: chunkpb.Status_STATUS_NOSPACE, Message: "test: the pool is full"}, nil
				}
				return &chunkpb.WriteChunkResponse{Status: chunkpb.Status_STATUS_OVERLOAD, Message: "test: busy"}, nil
			}
			return h(ctx, req)
		}
	}})
	createVolume(t, c, "full", seg)
	v := open(t, c, "full", client.Options{RetryTimeout: 2 * time.Second})
	if _, err := v.WriteAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	full.Store(true)
	_, err := v.WriteAt(ctx, make([]byte, 4096), 0)
	if !errors.Is(err, client.ErrNoSpace) {
		t.Fatalf("write into a full pool: %v, want ErrNoSpace", err)
	}
}
