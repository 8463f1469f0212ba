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
	stream transportpb.RaftTransport_InstallSnapshotClient
	conn   *grpc.ClientConn
	faults *Faults
	from   uint64
	to     uint64
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
	return &SnapshotStream{stream: stream, conn: conn, faults: t.cfg.Faults, from: t.cfg.NodeID, to: to}, nil
}

// ErrPartitioned is returned when a fault injector cuts a snapshot transfer.
var ErrPartitioned = errors.New("transport: peers partitioned")

// Send sends one frame.
func (s *SnapshotStream) Send(c *transportpb.SnapshotChunk) error {
	if s.faults != nil && s.faults.Partitioned(s.from, s.to) {
		return ErrPartitioned
	}
	c.From, c.To = s.from, s.to
	return s.stream.Send(c)
}

// Finish ends the transfer and returns the receiver's verdict.
func (s *SnapshotStream) Finish() error {
	defer s.conn.Close()
	if err := s.stream.Send(&transportpb.SnapshotChunk{From: s.from, To: s.to, Done: true}); err != nil {
		return fmt.Errorf("finish snapshot: %w", err)
	}
	res, err := s.stream.CloseAndRecv()
	if err != nil {
		return fmt.Errorf("finish snapshot: %w", err)
	}
	if !res.GetAccepted() {
		return fmt.Errorf("snapshot refused by chunkserver %d: %s", s.to, res.GetMessage())
	}
	return nil
}

// Abort abandons the transfer.
func (s *SnapshotStream) Abort() {
	_ = s.stream.CloseSend()
	s.conn.Close()
}
