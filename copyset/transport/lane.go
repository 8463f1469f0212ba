package transport

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/internal/wire"
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
// MaxBatchBytes of them per frame. The messages go into the batch as they
// are, unchanged (Raft may still hold them), and are encoded once, by the
// connection's writer.
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
		n := proto.Size(m)
		if len(b.Messages) > 0 && size+n > p.t.cfg.MaxBatchBytes {
			if err := l.sendFrame(b); err != nil {
				return err
			}
			b, size = &transportpb.RaftBatch{From: p.t.cfg.NodeID, To: p.id}, 0
		}
		b.Messages = append(b.Messages, &transportpb.GroupMessage{Group: o.group, Message: m})
		size += n
	}
	if len(b.Messages) > 0 || len(b.Heartbeats) > 0 {
		return l.sendFrame(b)
	}
	return nil
}

// sendFrame sends one RaftBatch on the lane's connection.
func (l *lane) sendFrame(b *transportpb.RaftBatch) error {
	p := l.p
	if err := l.client.Send(transportpb.WireRaftBatch, b); err != nil {
		return fmt.Errorf("send to %d: %w", p.id, err)
	}
	p.t.batches.Add(1)
	p.t.msgsSent.Add(uint64(len(b.Messages)))
	p.t.hbSent.Add(uint64(len(b.Heartbeats)))
	return nil
}

// connect opens the lane's connection to the peer: a wire connection of its
// own, so that megabytes of appends on the data lane never sit in front of
// the control lane's heartbeats in one socket.
func (l *lane) connect() error {
	if l.client != nil && l.client.Err() == nil {
		return nil
	}
	l.disconnect()
	p := l.p
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	addr, err := p.t.cfg.Resolver.Resolve(ctx, p.id)
	if err != nil {
		return fmt.Errorf("resolve chunkserver %d: %w", p.id, err)
	}
	c, err := wire.Dial(ctx, addr, wire.ClientOptions{Dialer: p.t.cfg.Dialer})
	if err != nil {
		return fmt.Errorf("connect to chunkserver %d: %w", p.id, err)
	}
	l.client = c
	return nil
}

func (l *lane) disconnect() {
	if l.client != nil {
		_ = l.client.Close()
		l.client = nil
	}
}
