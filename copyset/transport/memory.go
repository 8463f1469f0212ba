package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/internal/wire"
)

// Network connects the in-memory transports (Memory) of engines running
// in one process: a test tool for copyset tests that must not depend on
// sockets, ports or the scheduling of connection goroutines. A message is
// copied and handed to its receiver in the sender's goroutine, so nothing
// queues and nothing is lost unless a Faults drops it or the receiver has
// left.
type Network struct {
	mu    sync.Mutex
	nodes map[uint64]*Memory
}

// NewNetwork returns an empty in-memory network.
func NewNetwork() *Network { return &Network{nodes: map[uint64]*Memory{}} }

// Join attaches node cfg.NodeID to the network, replacing an earlier
// transport of the same node (a restart). Of cfg it uses NodeID, Handler,
// OnUnreachable, Faults and Logger; there is nothing to resolve or dial.
// Nothing reaches the node until Register is called (as nothing reaches a
// Transport before its servers serve).
func (n *Network) Join(cfg Config) *Memory {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m := &Memory{net: n, cfg: cfg}
	n.mu.Lock()
	n.nodes[cfg.NodeID] = m
	n.mu.Unlock()
	return m
}

// node returns the live transport of id, or nil.
func (n *Network) node(id uint64) *Memory {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.nodes[id]
	if m == nil || m.closed.Load() || !m.serving.Load() {
		return nil
	}
	return m
}

// errNoPeer is returned for a transfer to a node that is not on the network.
var errNoPeer = errors.New("transport: peer not on the network")

// Memory is one engine's end of a Network: it does what Transport does,
// without sockets.
type Memory struct {
	net     *Network
	cfg     Config
	closed  atomic.Bool
	serving atomic.Bool // set by Register

	msgsSent, msgsRecv, dropped atomic.Uint64
}

// Register makes the node reachable on its Network (it receives from the
// Network, not from the servers, which may be nil).
func (m *Memory) Register(*grpc.Server, *wire.Server) { m.serving.Store(true) }

// Stats returns traffic counters (heartbeats are counted as messages).
func (m *Memory) Stats() Stats {
	return Stats{MessagesSent: m.msgsSent.Load(), MessagesReceived: m.msgsRecv.Load(), Dropped: m.dropped.Load()}
}

// Close leaves the network: messages to this node are dropped from now on.
func (m *Memory) Close() { m.closed.Store(true) }

// SendNow is Send: the memory network has no sender to spare.
func (m *Memory) SendNow(group uint64, msg *raftpb.Message) bool { return m.Send(group, msg) }

// Send hands a copy of msg (of copyset group) to its receiver; it reports
// false when the message was dropped.
func (m *Memory) Send(group uint64, msg *raftpb.Message) bool {
	to := msg.GetTo()
	deliver := func() bool {
		peer := m.net.node(to)
		if peer == nil || m.closed.Load() {
			m.dropped.Add(1)
			if m.cfg.OnUnreachable != nil {
				m.cfg.OnUnreachable(to, []uint64{group})
			}
			return false
		}
		m.msgsSent.Add(1)
		peer.msgsRecv.Add(1)
		peer.cfg.Handler.HandleRaft(m.cfg.NodeID, group, proto.Clone(msg).(*raftpb.Message))
		return true
	}
	if f := m.cfg.Faults; f != nil {
		return f.apply(m.cfg.NodeID, to, deliver)
	}
	return deliver()
}

// OpenSnapshot opens a snapshot transfer to a node of the network: the
// receiver's HandleSnapshot runs in a goroutine of its own, reading the
// frames as they are sent.
func (m *Memory) OpenSnapshot(ctx context.Context, to uint64) (*SnapshotStream, error) {
	peer := m.net.node(to)
	if peer == nil {
		return nil, fmt.Errorf("snapshot to chunkserver %d: %w", to, errNoPeer)
	}
	ctx, cancel := context.WithCancel(ctx)
	out := &memOut{frames: make(chan *transportpb.SnapshotChunk), result: make(chan error, 1), ctx: ctx, cancel: cancel}
	go func() {
		var err error
		select {
		case header := <-out.frames:
			err = peer.cfg.Handler.HandleSnapshot(ctx, header, out.next)
		case <-ctx.Done():
			err = ctx.Err()
		}
		if err != nil {
			out.verdict.Store(&err)
		}
		out.result <- err
		cancel()
	}()
	return &SnapshotStream{out: out, faults: m.cfg.Faults, from: m.cfg.NodeID, to: to}, nil
}

// memOut hands snapshot frames to a receiver in the same process.
type memOut struct {
	frames chan *transportpb.SnapshotChunk
	result chan error
	// verdict is the receiver's refusal, stored before it cancels ctx.
	verdict atomic.Pointer[error]
	ctx     context.Context
	cancel  context.CancelFunc
}

func (o *memOut) send(c *transportpb.SnapshotChunk) error {
	select {
	case o.frames <- proto.Clone(c).(*transportpb.SnapshotChunk):
		return nil
	case <-o.ctx.Done():
		if v := o.verdict.Load(); v != nil {
			return fmt.Errorf("snapshot refused: %w", *v)
		}
		return fmt.Errorf("snapshot stream closed: %w", context.Cause(o.ctx))
	}
}

// next is the receiver's side of send: the following frame, io.EOF with
// the final one.
func (o *memOut) next() (*transportpb.SnapshotChunk, error) {
	select {
	case c := <-o.frames:
		if c.GetDone() {
			return c, io.EOF
		}
		return c, nil
	case <-o.ctx.Done():
		return nil, o.ctx.Err()
	}
}

func (o *memOut) closeAndRecv() (*transportpb.SnapshotResult, error) {
	err := <-o.result
	res := &transportpb.SnapshotResult{Accepted: err == nil}
	if err != nil {
		res.Message = err.Error()
	}
	return res, nil
}

func (o *memOut) abort() { o.cancel() }
