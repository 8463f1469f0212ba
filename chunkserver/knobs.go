package chunkserver

import (
	"context"

	"google.golang.org/grpc"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/copyset/transport"
)

// TestingKnobs are switches for tests; production code leaves them zero.
type TestingKnobs struct {
	// InterceptHeartbeat, if set, is called for every heartbeat with the
	// call that sends it to the MDS. It may drop the heartbeat (return an
	// error without calling), hold it before or after the call, or pass it
	// through; what it returns is what the chunkserver acts on.
	InterceptHeartbeat func(ctx context.Context, call func(context.Context) (*mdspb.HeartbeatResponse, error)) (*mdspb.HeartbeatResponse, error)
	// UnaryInterceptor, if set, wraps every unary call the chunkserver's
	// gRPC server handles (chunk IO, UpdateEpoch, copyset service), so that
	// a test can refuse or hold chosen calls.
	UnaryInterceptor grpc.UnaryServerInterceptor
	// Faults injects Raft network faults.
	Faults *transport.Faults
}
