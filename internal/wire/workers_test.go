package wire

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"cairn.io/cairn/internal/soon"
)

// TestWorkersAreReusedAndBounded: a burst of concurrent requests starts a
// worker each; once they are answered, maxIdleWorkers stay and the rest
// exit; later requests run on the workers that stayed; and when the
// connection closes, every worker exits.
func TestWorkersAreReusedAndBounded(t *testing.T) {
	release := make(chan struct{})
	srv := NewServer(ServerOptions{})
	srv.Handle(mBlock, "block", newBytes, func(context.Context, proto.Message) (proto.Message, error) {
		<-release
		return wrapperspb.Bytes(nil), nil
	})
	srv.Handle(mEcho, "echo", newBytes, func(_ context.Context, req proto.Message) (proto.Message, error) {
		return req, nil
	})
	addr := serveOn(t, srv)
	c := dial(t, addr, ClientOptions{})
	conn := func() *serverConn {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		for sc := range srv.conns {
			return sc
		}
		return nil
	}

	const burst = 3 * maxIdleWorkers
	var wg sync.WaitGroup
	for range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var resp wrapperspb.BytesValue
			if err := c.Call(context.Background(), mBlock, wrapperspb.Bytes(nil), &resp); err != nil {
				t.Error(err)
			}
		}()
	}
	soon.True(t, 10*time.Second, "a worker for each request of the burst", func() bool {
		sc := conn()
		return sc != nil && sc.workers.Load() == burst
	})
	close(release)
	wg.Wait()
	sc := conn()
	soon.True(t, 10*time.Second, "only maxIdleWorkers left, all idle", func() bool {
		return sc.workers.Load() == maxIdleWorkers && sc.idle.Load() == maxIdleWorkers
	})
	for range 100 {
		if _, err := echo(context.Background(), c, "x"); err != nil {
			t.Fatal(err)
		}
	}
	if n := sc.workers.Load(); n != maxIdleWorkers {
		t.Fatalf("%d workers after requests one at a time, want the %d that stayed", n, maxIdleWorkers)
	}
	_ = c.Close()
	soon.True(t, 10*time.Second, "every worker gone with the connection", func() bool { return sc.workers.Load() == 0 })
}

// TestIdleWorkersEndWithTheConnectionWhateverConnContextReturns: idle
// workers wait for the connection's own end, not for the context that
// ConnContext derived (which may never end): Close returns.
func TestIdleWorkersEndWithTheConnectionWhateverConnContextReturns(t *testing.T) {
	srv := NewServer(ServerOptions{ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
		return context.WithoutCancel(ctx)
	}})
	srv.Handle(mEcho, "echo", newBytes, func(_ context.Context, req proto.Message) (proto.Message, error) {
		return req, nil
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	c := dial(t, l.Addr().String(), ClientOptions{})
	if _, err := echo(context.Background(), c, "x"); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() {
		_ = srv.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waits for an idle worker after 10 s")
	}
}
