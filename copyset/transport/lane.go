package transport

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
)

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
