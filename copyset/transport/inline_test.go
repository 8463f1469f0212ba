package transport

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
)

// TestSendNowOnAnIdleLane checks that SendNow sends on the caller when the
// lane is idle with a connection up (never dialling itself), and that
// messages sent with Send and SendNow by one goroutine arrive in order.
func TestSendNowOnAnIdleLane(t *testing.T) {
	tx, col, _ := pair(t, nil)
	// No connection yet: the lane's goroutine dials.
	tx.SendNow(1, msg(raftpb.MsgAppResp, 2, 1, 1, 1, nil))
	waitCount(t, col, 1)
	if n := tx.Stats().SentInline; n != 0 {
		t.Fatalf("%d messages sent inline before the lane had a connection", n)
	}
	// Once the lane's sender is done with the first, a SendNow is sent by
	// its caller, before it returns.
	next := uint64(2)
	for deadline := time.Now().Add(10 * time.Second); tx.Stats().SentInline == 0; next++ {
		if time.Now().After(deadline) {
			t.Fatal("no message sent inline on an idle lane in 10s")
		}
		time.Sleep(time.Millisecond)
		tx.SendNow(1, msg(raftpb.MsgAppResp, 2, 1, 1, next, nil))
	}
	const burst = 300
	for i := next; i < next+burst; i++ {
		if i%3 == 0 {
			tx.SendNow(1, msg(raftpb.MsgAppResp, 2, 1, 1, i, nil))
		} else {
			tx.Send(1, msg(raftpb.MsgAppResp, 2, 1, 1, i, nil))
		}
	}
	waitCount(t, col, int(next+burst-1))
	col.mu.Lock()
	defer col.mu.Unlock()
	for i, r := range col.got {
		if r.m.GetCommit() != uint64(i)+1 {
			t.Fatalf("message %d carries commit %d: out of order", i, r.m.GetCommit())
		}
	}
}

// TestSendNowBesideAFailingLane sends with Send and SendNow from two
// goroutines while the peer goes away and comes back: the connection
// passes between the callers and the lane's goroutine through its failures
// and back-off, and messages flow again afterwards on both paths.
func TestSendNowBesideAFailingLane(t *testing.T) {
	a := addrs{}
	col := &collector{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	a[2] = addr
	rx := New(Config{NodeID: 2, Resolver: a, Handler: col})
	stop := serve(rx, lis, 0)
	tx := New(Config{NodeID: 1, Resolver: a, Handler: &collector{}})
	t.Cleanup(func() { tx.Close(); rx.Close() })
	var wg sync.WaitGroup
	var done atomic.Bool
	for g := uint64(1); g <= 2; g++ {
		wg.Add(1)
		go func(g uint64) {
			defer wg.Done()
			for i := uint64(1); !done.Load(); i++ {
				m := msg(raftpb.MsgAppResp, 2, 1, 1, i, nil)
				if g == 1 {
					tx.SendNow(g, m)
				} else {
					tx.Send(g, m)
				}
				time.Sleep(50 * time.Microsecond)
			}
		}(g)
	}
	waitCount(t, col, 100)
	inlineBefore := tx.Stats().SentInline
	stop() // the peer goes away: sends fail, the lane backs off
	time.Sleep(100 * time.Millisecond)
	lis, err = net.Listen("tcp", addr)
	if err != nil {
		done.Store(true)
		wg.Wait()
		t.Skipf("cannot listen on %s again: %v", addr, err)
	}
	stop = serve(rx, lis, 0)
	t.Cleanup(stop)
	n := col.count()
	waitCount(t, col, n+100) // delivered again
	inlineDuring := tx.Stats().SentInline
	deadline := time.Now().Add(10 * time.Second)
	for tx.Stats().SentInline == inlineDuring && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	done.Store(true)
	wg.Wait()
	st := tx.Stats()
	if st.Dropped == 0 {
		t.Fatal("nothing was dropped while the peer was away: the test did not exercise the failures")
	}
	if inlineBefore == 0 || st.SentInline == inlineDuring {
		t.Fatalf("messages sent inline: %d before the outage, %d after it came back, %d at the end: want some before and after",
			inlineBefore, inlineDuring, st.SentInline)
	}
}

// smallBuffers gives accepted connections a small receive buffer, so that a
// receiver that stops reading stops the sender's socket soon.
type smallBuffers struct{ net.Listener }

func (l smallBuffers) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(64 << 10)
	}
	return c, err
}

// TestStalledPeerNeverHoldsTheCaller sends appends with SendNow to a peer
// that stops reading: once its socket has no room, messages go to the
// lane's sender, which waits for the peer, and SendNow keeps returning at
// once instead of waiting out a write timeout.
func TestStalledPeerNeverHoldsTheCaller(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tx, h, release := stalledPeer(t, smallBuffers{lis})

	// The peer holds the first append and reads nothing after it: about
	// 4 MiB later the sender's socket is full.
	const n = 150
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := uint64(1); i <= n; i++ {
			app := msg(raftpb.MsgApp, 2, 1, 3, 1, nil)
			app.Entries = []*raftpb.Entry{{Index: new(i), Term: new(uint64(3)), Data: make([]byte, 60<<10)}}
			tx.SendNow(1, app)
			time.Sleep(100 * time.Microsecond) // let the lane's sender go idle now and then
		}
	}()
	select {
	case <-sent:
	case <-time.After(20 * time.Second):
		t.Fatalf("SendNow still blocked after 20s (inline sends: %d): a stalled peer held up the caller", tx.Stats().SentInline)
	}
	if tx.Stats().SentInline == 0 {
		t.Fatal("nothing was sent inline: the test did not exercise inline sends")
	}
	// No send was cut off by its deadline (a blocked write fails the
	// connection) and nothing was dropped: the callers never wrote into a
	// full socket.
	if st := tx.Stats(); st.Dropped != 0 {
		t.Fatalf("%d messages dropped", st.Dropped)
	}
	for _, ls := range tx.Lanes() {
		if ls.Failures != 0 {
			t.Fatalf("lane %s to %d failed %d times (%s): a caller wrote into a full socket", ls.Lane, ls.To, ls.Failures, ls.LastErr)
		}
	}
	release()
	waitCount(t, &h.collector, 1)
}
