package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
)

// Resolver maps a chunkserver (Raft node) id to its gRPC address.
type Resolver interface {
	Resolve(ctx context.Context, nodeID uint64) (string, error)
}

// Handler receives what peers send.
type Handler interface {
	// HandleRaft delivers one message of one copyset. It must not block.
	HandleRaft(from, group uint64, m *raftpb.Message)
	// HandleSnapshot receives one snapshot transfer: header is the first
	// frame; next returns the following frames until io.EOF.
	HandleSnapshot(ctx context.Context, header *transportpb.SnapshotChunk, next func() (*transportpb.SnapshotChunk, error)) error
}

// Config configures a Transport.
type Config struct {
	// NodeID is this chunkserver's id.
	NodeID   uint64
	Resolver Resolver
	Handler  Handler
	// QueueSize bounds the messages queued per peer (default 8192).
	QueueSize int
	// DialOptions are added to the defaults (insecure credentials).
	DialOptions []grpc.DialOption
	// OnUnreachable, if set, is told when messages to a peer were dropped.
	OnUnreachable func(to uint64, groups []uint64)
	// Faults, if set, injects faults into outgoing traffic (tests only).
	Faults *Faults
	Logger *slog.Logger
}

// Stats counts traffic, for metrics.
type Stats struct {
	MessagesSent, MessagesReceived     uint64
	HeartbeatsSent, HeartbeatsReceived uint64
	BatchesSent                        uint64
	Dropped                            uint64
}

// Transport sends and receives Raft traffic for one chunkserver.
type Transport struct {
	transportpb.UnimplementedRaftTransportServer

	cfg Config
	log *slog.Logger

	mu     sync.Mutex
	peers  map[uint64]*peer
	closed bool

	msgsSent, msgsRecv, hbSent, hbRecv, batches, dropped atomic.Uint64

	wg sync.WaitGroup
}

// outgoing is a queued message.
type outgoing struct {
	group uint64
	m     *raftpb.Message
}

type peer struct {
	t  *Transport
	id uint64

	mu     sync.Mutex
	queue  []outgoing
	wake   chan struct{}
	closed bool

	// owned by the sender goroutine
	addr   string
	conn   *grpc.ClientConn
	stream transportpb.RaftTransport_StreamClient
	cancel context.CancelFunc
}

// New creates a Transport; Register it on the chunkserver's gRPC server.
func New(cfg Config) *Transport {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 8192
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Transport{cfg: cfg, log: cfg.Logger.With("component", "raft-transport"), peers: make(map[uint64]*peer)}
}

// Register installs the transport's service on s.
func (t *Transport) Register(s *grpc.Server) {
	transportpb.RegisterRaftTransportServer(s, t)
}

// Stats returns traffic counters.
func (t *Transport) Stats() Stats {
	return Stats{
		MessagesSent: t.msgsSent.Load(), MessagesReceived: t.msgsRecv.Load(),
		HeartbeatsSent: t.hbSent.Load(), HeartbeatsReceived: t.hbRecv.Load(),
		BatchesSent: t.batches.Load(), Dropped: t.dropped.Load(),
	}
}

// Send queues m (of copyset group) for its destination m.To. It never blocks;
// it reports false when the message was dropped.
func (t *Transport) Send(group uint64, m *raftpb.Message) bool {
	to := m.GetTo()
	if f := t.cfg.Faults; f != nil {
		return f.apply(t.cfg.NodeID, to, func() bool { return t.enqueue(to, group, m) })
	}
	return t.enqueue(to, group, m)
}

func (t *Transport) enqueue(to, group uint64, m *raftpb.Message) bool {
	p := t.peer(to)
	if p == nil {
		return false
	}
	p.mu.Lock()
	if p.closed || len(p.queue) >= t.cfg.QueueSize {
		p.mu.Unlock()
		t.dropped.Add(1)
		t.unreachable(to, []uint64{group})
		return false
	}
	p.queue = append(p.queue, outgoing{group: group, m: m})
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	return true
}

func (t *Transport) unreachable(to uint64, groups []uint64) {
	if t.cfg.OnUnreachable != nil && len(groups) > 0 {
		t.cfg.OnUnreachable(to, groups)
	}
}

func (t *Transport) peer(id uint64) *peer {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	p := t.peers[id]
	if p == nil {
		p = &peer{t: t, id: id, wake: make(chan struct{}, 1)}
		t.peers[id] = p
		t.wg.Add(1)
		go p.run()
	}
	return p
}

// Close stops every sender and closes connections.
func (t *Transport) Close() {
	t.mu.Lock()
	t.closed = true
	peers := t.peers
	t.peers = map[uint64]*peer{}
	t.mu.Unlock()
	for _, p := range peers {
		p.mu.Lock()
		p.closed = true
		p.mu.Unlock()
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
	t.wg.Wait()
}

// run drains the peer's queue into batches until the transport closes.
func (p *peer) run() {
	defer p.t.wg.Done()
	defer p.disconnect()
	backoff := 10 * time.Millisecond
	for {
		<-p.wake
		for {
			p.mu.Lock()
			if p.closed {
				p.mu.Unlock()
				return
			}
			q := p.queue
			p.queue = nil
			p.mu.Unlock()
			if len(q) == 0 {
				break
			}
			if err := p.sendBatch(q); err != nil {
				p.t.dropped.Add(uint64(len(q)))
				p.t.unreachable(p.id, groupsOf(q))
				p.t.log.Debug("raft batch not delivered", "to", p.id, "messages", len(q), "err", err)
				p.disconnect()
				// Pause before the next attempt, dropping what queues up
				// meanwhile beyond the queue bound (Raft retries).
				time.Sleep(backoff)
				backoff = min(backoff*2, time.Second)
				continue
			}
			backoff = 10 * time.Millisecond
		}
	}
}

func groupsOf(q []outgoing) []uint64 {
	seen := make(map[uint64]bool, len(q))
	var gs []uint64
	for _, o := range q {
		if !seen[o.group] {
			seen[o.group] = true
			gs = append(gs, o.group)
		}
	}
	return gs
}

// sendBatch encodes q into one RaftBatch (coalescing heartbeats) and sends it.
func (p *peer) sendBatch(q []outgoing) error {
	b := &transportpb.RaftBatch{From: p.t.cfg.NodeID, To: p.id}
	for _, o := range q {
		m := o.m
		switch m.GetType() {
		case raftpb.MsgHeartbeat, raftpb.MsgHeartbeatResp:
			b.Heartbeats = append(b.Heartbeats, &transportpb.Heartbeat{
				Group:    o.group,
				Term:     m.GetTerm(),
				Commit:   m.GetCommit(),
				Context:  m.GetContext(),
				Response: m.GetType() == raftpb.MsgHeartbeatResp,
			})
		default:
			data, err := proto.Marshal(m)
			if err != nil {
				return fmt.Errorf("encode raft message: %w", err)
			}
			b.Messages = append(b.Messages, &transportpb.GroupMessage{Group: o.group, Message: data})
		}
	}
	if err := p.connect(); err != nil {
		return err
	}
	if err := p.stream.Send(b); err != nil {
		return fmt.Errorf("send to %d: %w", p.id, err)
	}
	p.t.batches.Add(1)
	p.t.msgsSent.Add(uint64(len(b.Messages)))
	p.t.hbSent.Add(uint64(len(b.Heartbeats)))
	return nil
}

func (p *peer) connect() error {
	if p.stream != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	addr, err := p.t.cfg.Resolver.Resolve(ctx, p.id)
	cancel()
	if err != nil {
		return fmt.Errorf("resolve chunkserver %d: %w", p.id, err)
	}
	if p.conn == nil || addr != p.addr {
		if p.conn != nil {
			p.conn.Close()
		}
		opts := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, p.t.cfg.DialOptions...)
		conn, err := grpc.NewClient(addr, opts...)
		if err != nil {
			return fmt.Errorf("dial chunkserver %d at %s: %w", p.id, addr, err)
		}
		p.conn, p.addr = conn, addr
	}
	sctx, scancel := context.WithCancel(context.Background())
	stream, err := transportpb.NewRaftTransportClient(p.conn).Stream(sctx)
	if err != nil {
		scancel()
		return fmt.Errorf("open raft stream to %d at %s: %w", p.id, addr, err)
	}
	p.stream, p.cancel = stream, scancel
	// Drain acks (and notice a refused stream) in the background.
	go func() {
		for {
			if _, err := stream.Recv(); err != nil {
				return
			}
		}
	}()
	return nil
}

func (p *peer) disconnect() {
	if p.cancel != nil {
		p.cancel()
		p.cancel = nil
	}
	p.stream = nil
	if p.conn != nil && p.isClosed() {
		p.conn.Close()
		p.conn = nil
	}
}

func (p *peer) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

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
