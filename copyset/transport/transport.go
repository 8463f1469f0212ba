package transport

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/internal/wire"
)

// Resolver maps a chunkserver (Raft node) id to its gRPC address.
type Resolver interface {
	Resolve(ctx context.Context, nodeID uint64) (string, error)
}

// Handler receives what peers send.
type Handler interface {
	// HandleRaft delivers one message of one copyset. It must not wait for
	// anything but, at most, one small write to the disk (a follower makes
	// a lone append durable on the caller: wal.WAL.TryCommit).
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
	// DialOptions are added to the defaults (insecure credentials) for
	// snapshot transfers.
	DialOptions []grpc.DialOption
	// Dialer, if set, opens the connections that carry Raft batches
	// (default: TCP with a 5s timeout).
	Dialer func(ctx context.Context, addr string) (net.Conn, error)
	// AuthorizeSender, if set, is asked whether the caller of a received
	// Raft batch or snapshot (ctx carries its connection) may speak for
	// chunkserver from; a refused batch closes its connection, a refused
	// snapshot is not taken.
	AuthorizeSender func(ctx context.Context, from uint64) error
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
	// SentInline counts messages sent on the goroutine that queued them.
	SentInline uint64
	Dropped    uint64
}

// Transport sends and receives Raft traffic for one chunkserver.
type Transport struct {
	transportpb.UnimplementedRaftTransportServer

	cfg Config
	log *slog.Logger

	mu     sync.Mutex
	peers  map[uint64]*peer
	closed bool

	msgsSent, msgsRecv, hbSent, hbRecv, batches, dropped, inline atomic.Uint64

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

// peer is the link to one other chunkserver: its lanes.
type peer struct {
	t     *Transport
	id    uint64
	lanes [numLanes]*lane
}

// lane is one queue and stream to a peer, drained by its own goroutine
// (or, when idle, by a caller of SendNow).
type lane struct {
	p    *peer
	name string

	mu      sync.Mutex
	queue   []outgoing
	bytes   int // of the messages in queue
	wake    chan struct{}
	closed  bool
	sending bool // the connection is taken: by the lane's goroutine or a caller of SendNow

	// Owned by whoever took the connection (sending).
	client  *wire.Client
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

// New creates a Transport; Register it on the chunkserver's servers.
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

// Register installs the transport's receiving side: Raft batches on the
// wire server w, snapshot transfers on the gRPC server g.
func (t *Transport) Register(g *grpc.Server, w *wire.Server) {
	transportpb.RegisterRaftTransportServer(g, t)
	w.HandleMessage(transportpb.WireRaftBatch, transportpb.WireRaftBatchName, t.receive)
}

// Stats returns traffic counters.
func (t *Transport) Stats() Stats {
	return Stats{
		MessagesSent: t.msgsSent.Load(), MessagesReceived: t.msgsRecv.Load(),
		HeartbeatsSent: t.hbSent.Load(), HeartbeatsReceived: t.hbRecv.Load(),
		BatchesSent: t.batches.Load(), Dropped: t.dropped.Load(), SentInline: t.inline.Load(),
	}
}

// Send queues m (of copyset group) for its destination m.To. It never blocks;
// it reports false when the message was dropped.
func (t *Transport) Send(group uint64, m *raftpb.Message) bool {
	return t.send(group, m, false)
}

// SendNow is Send for a caller with little else to do: when m's lane is
// idle, m is small and the lane's connection has room for it, the caller
// sends it (lane.sendHere), sparing the wake-up of the lane's sender. It
// does not wait for a slow peer.
func (t *Transport) SendNow(group uint64, m *raftpb.Message) bool {
	return t.send(group, m, true)
}

func (t *Transport) send(group uint64, m *raftpb.Message, now bool) bool {
	to := m.GetTo()
	if f := t.cfg.Faults; f != nil {
		return f.apply(t.cfg.NodeID, to, func() bool { return t.enqueue(to, group, m, now) })
	}
	return t.enqueue(to, group, m, now)
}

func (t *Transport) enqueue(to, group uint64, m *raftpb.Message, now bool) bool {
	p := t.peer(to)
	if p == nil {
		return false
	}
	l := p.lanes[laneOf(m)]
	size := messageSize(m)
	o := outgoing{group: group, m: m}
	l.mu.Lock()
	if now && !l.closed && size <= inlineMaxBytes && len(l.queue) == 0 && !l.sending {
		l.sending = true
		l.mu.Unlock()
		if l.sendHere(o, size) {
			return true
		}
		// Queued behind what others queued meanwhile: they are other
		// copysets'.
		l.mu.Lock()
	}
	if l.closed || len(l.queue) >= t.cfg.QueueSize || (len(l.queue) > 0 && l.bytes+size > t.cfg.QueueBytes) {
		l.mu.Unlock()
		t.dropped.Add(1)
		t.unreachable(to, []uint64{group})
		return false
	}
	l.queue = append(l.queue, o)
	l.bytes += size
	l.mu.Unlock()
	l.signal()
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
}
