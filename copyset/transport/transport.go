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

// DefaultMaxBatchBytes is the default Config.MaxBatchBytes: large enough to
// amortise a frame over many small appends, far below the chunkserver's gRPC
// receive limit (its largest IO plus 1 MiB).
const DefaultMaxBatchBytes = 1 << 20

// Config configures a Transport.
type Config struct {
	// NodeID is this chunkserver's id.
	NodeID   uint64
	Resolver Resolver
	Handler  Handler
	// QueueSize bounds the messages queued per peer lane (default 8192).
	QueueSize int
	// QueueBytes bounds the bytes of the messages queued per peer lane
	// (default 16 MiB). A message that would exceed either bound is
	// dropped and its copyset told the peer is unreachable; Raft resends.
	QueueBytes int
	// MaxBatchBytes bounds the Raft message bytes sent in one stream frame
	// (default DefaultMaxBatchBytes). A queue holding more is sent as several
	// frames, so a burst of large appends never exceeds the receiving
	// server's message size limit; a single larger message goes alone.
	MaxBatchBytes int
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

// Lanes of a peer. Appends and their acknowledgements go on the data lane,
// where they share frames; everything else (heartbeats, votes, leadership
// transfer) on the control lane, a stream of its own with its own sender, so
// megabytes of appends queued for a peer never delay the messages that keep
// leaders in office.
const (
	controlLane = iota
	dataLane
	numLanes
)

var laneNames = [numLanes]string{"control", "data"}

func laneOf(m *raftpb.Message) int {
	if t := m.GetType(); t == raftpb.MsgApp || t == raftpb.MsgAppResp {
		return dataLane
	}
	return controlLane
}

// peer is the link to one other chunkserver: a connection shared by its
// lanes.
type peer struct {
	t     *Transport
	id    uint64
	lanes [numLanes]*lane

	connMu sync.Mutex
	addr   string
	conn   *grpc.ClientConn
	closed bool
}

// lane is one queue and stream to a peer, drained by its own goroutine.
type lane struct {
	p    *peer
	name string

	mu     sync.Mutex
	queue  []outgoing
	bytes  int // of the messages in queue
	wake   chan struct{}
	closed bool

	// owned by the lane's goroutine
	stream  transportpb.RaftTransport_StreamClient
	cancel  context.CancelFunc
	failing bool

	// lastErr and failures describe the lane's last outage; guarded by mu.
	lastErr  error
	failures uint64
	sentOK   uint64
}

// LaneStatus describes one lane to one peer, for diagnosis.
type LaneStatus struct {
	To       uint64
	Lane     string
	Queued   int    // messages waiting
	Failures uint64 // batches that could not be sent
	Sent     uint64 // batches sent
	LastErr  string // the last send error, "" if none
}

// Lanes reports the state of every lane to every peer.
func (t *Transport) Lanes() []LaneStatus {
	t.mu.Lock()
	peers := make([]*peer, 0, len(t.peers))
	for _, p := range t.peers {
		peers = append(peers, p)
	}
	t.mu.Unlock()
	var out []LaneStatus
	for _, p := range peers {
		for _, l := range p.lanes {
			l.mu.Lock()
			st := LaneStatus{To: p.id, Lane: l.name, Queued: len(l.queue), Failures: l.failures, Sent: l.sentOK}
			if l.lastErr != nil {
				st.LastErr = l.lastErr.Error()
			}
			l.mu.Unlock()
			out = append(out, st)
		}
	}
	return out
}

// New creates a Transport; Register it on the chunkserver's gRPC server.
func New(cfg Config) *Transport {
	if cfg.QueueSize <= 0 {
		cfg.QueueSize = 8192
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = 16 << 20
	}
	if cfg.MaxBatchBytes <= 0 {
		cfg.MaxBatchBytes = DefaultMaxBatchBytes
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
	l := p.lanes[laneOf(m)]
	size := messageSize(m)
	l.mu.Lock()
	if l.closed || len(l.queue) >= t.cfg.QueueSize || (len(l.queue) > 0 && l.bytes+size > t.cfg.QueueBytes) {
		l.mu.Unlock()
		t.dropped.Add(1)
		t.unreachable(to, []uint64{group})
		return false
	}
	l.queue = append(l.queue, outgoing{group: group, m: m})
	l.bytes += size
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	return true
}

// messageSize approximates the memory a queued message holds.
func messageSize(m *raftpb.Message) int {
	n := 64
	for _, e := range m.GetEntries() {
		n += 32 + len(e.GetData())
	}
	return n
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
		p = &peer{t: t, id: id}
		for i := range p.lanes {
			l := &lane{p: p, name: laneNames[i], wake: make(chan struct{}, 1)}
			p.lanes[i] = l
			t.wg.Add(1)
			go l.run()
		}
		t.peers[id] = p
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
		for _, l := range p.lanes {
			l.mu.Lock()
			l.closed = true
			l.mu.Unlock()
			select {
			case l.wake <- struct{}{}:
			default:
			}
		}
	}
	t.wg.Wait()
	for _, p := range peers {
		p.connMu.Lock()
		p.closed = true
		if p.conn != nil {
			p.conn.Close()
			p.conn = nil
		}
		p.connMu.Unlock()
	}
}

// run drains the lane's queue into batches until the transport closes.
func (l *lane) run() {
	p := l.p
	defer p.t.wg.Done()
	defer l.disconnect()
	backoff := 10 * time.Millisecond
	for {
		<-l.wake
		for {
			l.mu.Lock()
			if l.closed {
				l.mu.Unlock()
				return
			}
			q := l.queue
			l.queue, l.bytes = nil, 0
			l.mu.Unlock()
			if len(q) == 0 {
				break
			}
			if err := l.sendBatch(q); err != nil {
				l.mu.Lock()
				l.lastErr, l.failures = err, l.failures+1
				l.mu.Unlock()
				p.t.dropped.Add(uint64(len(q)))
				p.t.unreachable(p.id, groupsOf(q))
				// Warn once per outage; a peer that stays down would
				// otherwise log at every retry.
				lvl := slog.LevelDebug
				if !l.failing {
					lvl = slog.LevelWarn
				}
				l.failing = true
				p.t.log.Log(context.Background(), lvl, "raft messages not delivered", "to", p.id, "lane", l.name, "messages", len(q), "err", err)
				l.disconnect()
				// Pause before the next attempt, dropping what queues up
				// meanwhile beyond the queue bound (Raft retries).
				time.Sleep(backoff)
				backoff = min(backoff*2, time.Second)
				continue
			}
			l.mu.Lock()
			l.sentOK++
			l.mu.Unlock()
			if l.failing {
				p.t.log.Info("raft messages delivered again", "to", p.id, "lane", l.name)
				l.failing = false
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

// sendBatch sends q as RaftBatch frames: heartbeats of all copysets
// coalesced into the first frame, then the other messages in order, at most
// MaxBatchBytes of them per frame.
func (l *lane) sendBatch(q []outgoing) error {
	p := l.p
	if err := l.connect(); err != nil {
		return err
	}
	b := &transportpb.RaftBatch{From: p.t.cfg.NodeID, To: p.id}
	for _, o := range q {
		m := o.m
		if t := m.GetType(); t == raftpb.MsgHeartbeat || t == raftpb.MsgHeartbeatResp {
			b.Heartbeats = append(b.Heartbeats, &transportpb.Heartbeat{
				Group:    o.group,
				Term:     m.GetTerm(),
				Commit:   m.GetCommit(),
				Context:  m.GetContext(),
				Response: t == raftpb.MsgHeartbeatResp,
			})
		}
	}
	size := 0
	for _, o := range q {
		m := o.m
		if t := m.GetType(); t == raftpb.MsgHeartbeat || t == raftpb.MsgHeartbeatResp {
			continue
		}
		data, err := proto.Marshal(m)
		if err != nil {
			return fmt.Errorf("encode raft message: %w", err)
		}
		if len(b.Messages) > 0 && size+len(data) > p.t.cfg.MaxBatchBytes {
			if err := l.sendFrame(b); err != nil {
				return err
			}
			b, size = &transportpb.RaftBatch{From: p.t.cfg.NodeID, To: p.id}, 0
		}
		b.Messages = append(b.Messages, &transportpb.GroupMessage{Group: o.group, Message: data})
		size += len(data)
	}
	if len(b.Messages) > 0 || len(b.Heartbeats) > 0 {
		return l.sendFrame(b)
	}
	return nil
}

// sendFrame sends one RaftBatch on the lane's stream.
func (l *lane) sendFrame(b *transportpb.RaftBatch) error {
	p := l.p
	if err := l.stream.Send(b); err != nil {
		return fmt.Errorf("send to %d: %w", p.id, err)
	}
	p.t.batches.Add(1)
	p.t.msgsSent.Add(uint64(len(b.Messages)))
	p.t.hbSent.Add(uint64(len(b.Heartbeats)))
	return nil
}

// connect opens the lane's stream, dialling the peer if needed.
func (l *lane) connect() error {
	if l.stream != nil {
		return nil
	}
	conn, addr, err := l.p.dial()
	if err != nil {
		return err
	}
	sctx, scancel := context.WithCancel(context.Background())
	stream, err := transportpb.NewRaftTransportClient(conn).Stream(sctx)
	if err != nil {
		scancel()
		return fmt.Errorf("open raft stream to %d at %s: %w", l.p.id, addr, err)
	}
	l.stream, l.cancel = stream, scancel
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

// dial returns the peer's connection, (re)creating it when the peer's
// address changed.
func (p *peer) dial() (*grpc.ClientConn, string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	addr, err := p.t.cfg.Resolver.Resolve(ctx, p.id)
	cancel()
	if err != nil {
		return nil, "", fmt.Errorf("resolve chunkserver %d: %w", p.id, err)
	}
	p.connMu.Lock()
	defer p.connMu.Unlock()
	if p.closed {
		return nil, "", fmt.Errorf("raft transport to %d closed", p.id)
	}
	if p.conn == nil || addr != p.addr {
		if p.conn != nil {
			p.conn.Close()
		}
		opts := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, p.t.cfg.DialOptions...)
		conn, err := grpc.NewClient(addr, opts...)
		if err != nil {
			return nil, "", fmt.Errorf("dial chunkserver %d at %s: %w", p.id, addr, err)
		}
		p.conn, p.addr = conn, addr
	}
	return p.conn, addr, nil
}

func (l *lane) disconnect() {
	if l.cancel != nil {
		l.cancel()
		l.cancel = nil
	}
	l.stream = nil
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
