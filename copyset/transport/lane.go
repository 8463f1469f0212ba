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
	backoff := 10 * time.Millisecond
	for {
		<-l.wake
		for {
			l.mu.Lock()
			if l.sending {
				// An inline sender has the connection; it wakes the
				// lane when it is done and anything is left.
				l.mu.Unlock()
				break
			}
			if l.closed {
				l.sending = true // for good
				l.mu.Unlock()
				l.disconnect()
				return
			}
			q := l.queue
			l.queue, l.bytes = nil, 0
			l.sending = len(q) > 0
			l.mu.Unlock()
			if len(q) == 0 {
				break
			}
			err := l.sendBatch(q)
			if err != nil {
				l.failed(q, err)
			} else if l.failing {
				p.t.log.Info("raft messages delivered again", "to", p.id, "lane", l.name)
				l.failing = false
			}
			l.mu.Lock()
			l.sending = false
			if err == nil {
				l.sentOK++
			}
			l.mu.Unlock()
			if err != nil {
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

// failed records that the messages q could not be sent, and drops the
// connection. The caller has the connection (l.sending).
func (l *lane) failed(q []outgoing, err error) {
	p := l.p
	l.mu.Lock()
	l.lastErr, l.failures = err, l.failures+1
	l.mu.Unlock()
	p.t.dropped.Add(uint64(len(q)))
	p.t.unreachable(p.id, groupsOf(q))
	// Warn once per outage; a peer that stays down would otherwise log at
	// every retry.
	lvl := slog.LevelDebug
	if !l.failing {
		lvl = slog.LevelWarn
	}
	l.failing = true
	p.t.log.Log(context.Background(), lvl, "raft messages not delivered", "to", p.id, "lane", l.name, "messages", len(q), "err", err)
	l.disconnect()
}

// release gives the connection back after sendHere, and wakes the lane's
// goroutine when anything queued meanwhile or the transport closed.
func (l *lane) release() {
	l.mu.Lock()
	l.sending = false
	wake := len(l.queue) > 0 || l.closed
	l.mu.Unlock()
	if wake {
		l.signal()
	}
}

// signal wakes the lane's goroutine.
func (l *lane) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// Sending on the caller (Transport.SendNow).
//
// A goroutine that wakes the lane's sender for one message pays for the
// wake-up of another thread, tens of microseconds on a busy machine: at
// depth one that is a good part of a follower's answer. So a follower that
// made a lone append durable itself sends the answer itself, when the lane
// has nothing queued and no send in progress, the connection is up and
// its socket has room (wire.Client.HasRoom), so that the write does not
// wait on the peer. It never dials. The write still has a deadline
// (inlineWriteTimeout): a peer that takes nothing for that long loses the
// connection, as it would the lane's.

const (
	// inlineMaxBytes bounds the messages sent by a caller.
	inlineMaxBytes = 64 << 10
	// inlineWriteTimeout bounds a caller's write.
	inlineWriteTimeout = time.Second
)

// sendHere sends o on the calling goroutine, which has taken the
// connection (l.sending), and gives it back. It reports false, having sent
// nothing, when the lane has no healthy connection or its socket no room;
// a failed send counts as sent (dropped, as by the lane's goroutine).
func (l *lane) sendHere(o outgoing, size int) bool {
	defer l.release()
	c := l.client
	if l.failing || c == nil || !c.HasRoom(size) {
		return false
	}
	q := []outgoing{o}
	ctx, cancel := context.WithTimeout(context.Background(), inlineWriteTimeout)
	err := l.sendFrames(ctx, q)
	cancel()
	if err != nil {
		l.failed(q, err)
		return true
	}
	l.p.t.inline.Add(1)
	l.mu.Lock()
	l.sentOK++
	l.mu.Unlock()
	return true
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
	if err := l.connect(); err != nil {
		return err
	}
	return l.sendFrames(context.Background(), q)
}

// sendFrames sends q on the lane's connection, which is up (sendBatch).
func (l *lane) sendFrames(ctx context.Context, q []outgoing) error {
	p := l.p
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
			if err := l.sendFrame(ctx, b); err != nil {
				return err
			}
			b, size = &transportpb.RaftBatch{From: p.t.cfg.NodeID, To: p.id}, 0
		}
		b.Messages = append(b.Messages, &transportpb.GroupMessage{Group: o.group, Message: m})
		size += n
	}
	if len(b.Messages) > 0 || len(b.Heartbeats) > 0 {
		return l.sendFrame(ctx, b)
	}
	return nil
}

// sendFrame sends one RaftBatch on the lane's connection.
func (l *lane) sendFrame(ctx context.Context, b *transportpb.RaftBatch) error {
	p := l.p
	if err := l.client.SendContext(ctx, transportpb.WireRaftBatch, b); err != nil {
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
