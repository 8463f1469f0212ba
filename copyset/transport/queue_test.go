package transport

import (
	"context"
	"sync/atomic"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
)

// stuckResolver never answers until released: a peer whose sender is stuck
// dialling, so that everything sent to it queues.
type stuckResolver struct{ release chan struct{} }

func (r stuckResolver) Resolve(ctx context.Context, _ uint64) (string, error) {
	select {
	case <-r.release:
	case <-ctx.Done():
	}
	return "", context.Canceled
}

// TestQueueIsBoundedInBytes sends megabytes of appends to a peer that
// takes nothing: the lane's queue stops growing at QueueBytes, the rest is
// dropped (Raft resends) and the copyset is told its peer is unreachable.
func TestQueueIsBoundedInBytes(t *testing.T) {
	const limit = 4 << 20
	res := stuckResolver{release: make(chan struct{})}
	var unreachable atomic.Int64
	tr := New(Config{
		NodeID: 1, Resolver: res, Handler: &collector{}, QueueBytes: limit,
		OnUnreachable: func(uint64, []uint64) { unreachable.Add(1) },
	})
	defer func() {
		close(res.release)
		tr.Close()
	}()
	payload := make([]byte, 512<<10)
	accepted := 0
	for i := range 40 {
		typ, to, idx := raftpb.MsgApp, uint64(2), uint64(i+1)
		m := &raftpb.Message{Type: &typ, To: &to, Entries: []*raftpb.Entry{{Index: &idx, Data: payload}}}
		if tr.Send(7, m) {
			accepted++
		}
		l := tr.peer(2).lanes[dataLane]
		l.mu.Lock()
		queued := l.bytes
		l.mu.Unlock()
		if queued > limit {
			t.Fatalf("after %d sends the lane holds %d bytes, limit %d", i+1, queued, limit)
		}
	}
	// The sender holds at most one batch it took before it got stuck.
	if accepted > 2*limit/len(payload)+1 {
		t.Fatalf("%d of 40 half-megabyte appends accepted with a %d-byte queue", accepted, limit)
	}
	if unreachable.Load() == 0 || tr.Stats().Dropped == 0 {
		t.Fatal("appends were dropped without telling Raft")
	}
}
