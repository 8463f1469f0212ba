package transport

import (
	"errors"
	"io"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
)

// Stream is the server side of a peer's batch stream.
func (t *Transport) Stream(srv transportpb.RaftTransport_StreamServer) error {
	for {
		b, err := srv.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		if b.GetTo() != t.cfg.NodeID {
			return status.Errorf(codes.FailedPrecondition, "raft batch for chunkserver %d reached chunkserver %d", b.GetTo(), t.cfg.NodeID)
		}
		from := b.GetFrom()
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
			m := &raftpb.Message{}
			if err := proto.Unmarshal(gm.GetMessage(), m); err != nil {
				return status.Errorf(codes.InvalidArgument, "decode raft message from %d: %v", from, err)
			}
			t.cfg.Handler.HandleRaft(from, gm.GetGroup(), m)
		}
		t.hbRecv.Add(uint64(len(b.GetHeartbeats())))
		t.msgsRecv.Add(uint64(len(b.GetMessages())))
	}
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
