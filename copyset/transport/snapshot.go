package transport

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"cairn.io/cairn/api/transportpb"
)

// SnapshotStream is the sending side of one snapshot transfer.
type SnapshotStream struct {
	out    snapshotOut
	faults *Faults
	from   uint64
	to     uint64
}

// snapshotOut is where a SnapshotStream's frames go: a gRPC client stream
// (Transport) or a receiver in the same process (Memory).
type snapshotOut interface {
	send(*transportpb.SnapshotChunk) error
	// closeAndRecv ends the transfer and waits for the receiver's verdict.
	closeAndRecv() (*transportpb.SnapshotResult, error)
	// abort abandons the transfer.
	abort()
}

// grpcOut sends a snapshot on an InstallSnapshot client stream.
type grpcOut struct {
	stream transportpb.RaftTransport_InstallSnapshotClient
	conn   *grpc.ClientConn
}

func (g *grpcOut) send(c *transportpb.SnapshotChunk) error { return g.stream.Send(c) }

func (g *grpcOut) closeAndRecv() (*transportpb.SnapshotResult, error) {
	defer g.conn.Close()
	return g.stream.CloseAndRecv()
}

func (g *grpcOut) abort() {
	_ = g.stream.CloseSend()
	g.conn.Close()
}

// OpenSnapshot opens a snapshot transfer to a peer.
func (t *Transport) OpenSnapshot(ctx context.Context, to uint64) (*SnapshotStream, error) {
	addr, err := t.cfg.Resolver.Resolve(ctx, to)
	if err != nil {
		return nil, fmt.Errorf("resolve chunkserver %d: %w", to, err)
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, t.cfg.DialOptions...)
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial chunkserver %d at %s: %w", to, addr, err)
	}
	stream, err := transportpb.NewRaftTransportClient(conn).InstallSnapshot(ctx)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("open snapshot stream to %d: %w", to, err)
	}
	return &SnapshotStream{out: &grpcOut{stream: stream, conn: conn}, faults: t.cfg.Faults, from: t.cfg.NodeID, to: to}, nil
}

// ErrPartitioned is returned when a fault injector cuts a snapshot transfer.
var ErrPartitioned = errors.New("transport: peers partitioned")

// Send sends one frame.
func (s *SnapshotStream) Send(c *transportpb.SnapshotChunk) error {
	if s.faults != nil && s.faults.Partitioned(s.from, s.to) {
		return ErrPartitioned
	}
	c.From, c.To = s.from, s.to
	return s.out.send(c)
}

// Finish ends the transfer and returns the receiver's verdict.
func (s *SnapshotStream) Finish() error {
	if err := s.out.send(&transportpb.SnapshotChunk{From: s.from, To: s.to, Done: true}); err != nil {
		s.out.abort()
		return fmt.Errorf("finish snapshot: %w", err)
	}
	res, err := s.out.closeAndRecv()
	if err != nil {
		return fmt.Errorf("finish snapshot: %w", err)
	}
	if !res.GetAccepted() {
		return fmt.Errorf("snapshot refused by chunkserver %d: %s", s.to, res.GetMessage())
	}
	return nil
}

// Abort abandons the transfer.
func (s *SnapshotStream) Abort() { s.out.abort() }
