package transport

import (
	"context"
	"fmt"
	"io"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
)

// receive delivers one Raft batch that arrived on a wire connection; an
// error closes that connection. Decoding the batch decodes its Raft
// messages too, into memory of their own (payload is reused after the
// call), and hands them on as they are.
func (t *Transport) receive(ctx context.Context, payload []byte) error {
	var b transportpb.RaftBatch
	if err := proto.Unmarshal(payload, &b); err != nil {
		return fmt.Errorf("decode raft batch: %w", err)
	}
	if b.GetTo() != t.cfg.NodeID {
		return fmt.Errorf("raft batch for chunkserver %d reached chunkserver %d", b.GetTo(), t.cfg.NodeID)
	}
	from := b.GetFrom()
	if auth := t.cfg.AuthorizeSender; auth != nil {
		if err := auth(ctx, from); err != nil {
			return fmt.Errorf("raft batch from chunkserver %d refused: %w", from, err)
		}
	}
	for _, h := range b.GetHeartbeats() {
		typ := raftpb.MsgHeartbeat
		if h.GetResponse() {
			typ = raftpb.MsgHeartbeatResp
		}
		m := &raftpb.Message{Type: &typ, To: &t.cfg.NodeID, From: &from, Term: new(h.GetTerm()), Context: h.GetContext()}
		if !h.GetResponse() {
			m.Commit = new(h.GetCommit())
		}
		t.cfg.Handler.HandleRaft(from, h.GetGroup(), m)
	}
	for _, gm := range b.GetMessages() {
		m := gm.GetMessage()
		if m == nil {
			// An empty encoding, which a sender of the field as bytes
			// leaves out.
			m = &raftpb.Message{}
		}
		t.cfg.Handler.HandleRaft(from, gm.GetGroup(), m)
	}
	t.hbRecv.Add(uint64(len(b.GetHeartbeats())))
	t.msgsRecv.Add(uint64(len(b.GetMessages())))
	return nil
}

// InstallSnapshot is the server side of a snapshot transfer.
func (t *Transport) InstallSnapshot(srv transportpb.RaftTransport_InstallSnapshotServer) error {
	header, err := srv.Recv()
	if err != nil {
		return err
	}
	if header.GetTo() != t.cfg.NodeID {
		return status.Errorf(codes.FailedPrecondition, "snapshot for chunkserver %d reached chunkserver %d", header.GetTo(), t.cfg.NodeID)
	}
	if auth := t.cfg.AuthorizeSender; auth != nil {
		if err := auth(srv.Context(), header.GetFrom()); err != nil {
			return status.Errorf(codes.PermissionDenied, "snapshot from chunkserver %d refused: %v", header.GetFrom(), err)
		}
	}
	err = t.cfg.Handler.HandleSnapshot(srv.Context(), header, func() (*transportpb.SnapshotChunk, error) {
		c, err := srv.Recv()
		if err != nil {
			return nil, err
		}
		if c.GetDone() {
			return c, io.EOF
		}
		return c, nil
	})
	res := &transportpb.SnapshotResult{Accepted: err == nil}
	if err != nil {
		res.Message = err.Error()
	}
	return srv.SendAndClose(res)
}
