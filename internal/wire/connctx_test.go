package wire

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestConnContextIsMadeOncePerConnection: ConnContext runs once for each
// connection, and what it puts in the context reaches Authorize and the
// handlers of every request and message the connection carries.
func TestConnContextIsMadeOncePerConnection(t *testing.T) {
	type key struct{}
	var made atomic.Int32
	var seen sync.Map // "authorize <method>", "handle <method>" -> the value in its context
	srv := NewServer(ServerOptions{
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if ConnOf(ctx) != c {
				t.Error("ConnContext's context does not carry the connection")
			}
			return context.WithValue(ctx, key{}, made.Add(1))
		},
		Authorize: func(ctx context.Context, method string) error {
			seen.Store("authorize "+method, ctx.Value(key{}))
			return nil
		},
	})
	srv.Handle(mEcho, "echo", newBytes, func(ctx context.Context, req proto.Message) (proto.Message, error) {
		seen.Store("handle echo", ctx.Value(key{}))
		return req, nil
	})
	srv.HandleMessage(mNote, "note", func(ctx context.Context, _ []byte) error {
		seen.Store("handle note", ctx.Value(key{}))
		return nil
	})
	addr := serveOn(t, srv)
	c := dial(t, addr, ClientOptions{})
	for range 3 {
		if err := c.Send(mNote, wrapperspb.String("n")); err != nil {
			t.Fatal(err)
		}
		if _, err := echo(context.Background(), c, "x"); err != nil {
			t.Fatal(err)
		}
	}
	if n := made.Load(); n != 1 {
		t.Fatalf("ConnContext ran %d times for one connection", n)
	}
	for _, m := range []string{"authorize echo", "authorize note", "handle echo", "handle note"} {
		if v, _ := seen.Load(m); v != int32(1) {
			t.Errorf("%s saw %v, want the connection's value 1", m, v)
		}
	}
	c2 := dial(t, addr, ClientOptions{})
	if _, err := echo(context.Background(), c2, "y"); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"authorize echo", "handle echo"} {
		if v, _ := seen.Load(m); v != int32(2) || made.Load() != 2 {
			t.Errorf("a second connection: ConnContext ran %d times, %s saw %v", made.Load(), m, v)
		}
	}
}
