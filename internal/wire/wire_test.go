package wire

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"cairn.io/cairn/internal/soon"
)

const (
	mEcho Method = iota + 1
	mBlock
	mFail
	mNote
)

func newBytes() proto.Message { return &wrapperspb.BytesValue{} }

// testServer serves echo (the request's bytes reversed), block (waits for
// its context, reports how it ended on ended), fail and one-way notes.
type testServer struct {
	srv   *Server
	addr  string
	ended chan error
	// deadlines receives the time left before each block call's deadline
	// as its handler starts, -1 for none.
	deadlines chan time.Duration

	mu    sync.Mutex
	notes []string
}

func startServer(t *testing.T, opts ServerOptions) *testServer {
	t.Helper()
	ts := &testServer{srv: NewServer(opts), ended: make(chan error, 100), deadlines: make(chan time.Duration, 100)}
	ts.srv.Handle(mEcho, "echo", newBytes, func(_ context.Context, req proto.Message) (proto.Message, error) {
		b := bytes.Clone(req.(*wrapperspb.BytesValue).GetValue())
		for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
			b[i], b[j] = b[j], b[i]
		}
		return wrapperspb.Bytes(b), nil
	})
	ts.srv.Handle(mBlock, "block", newBytes, func(ctx context.Context, _ proto.Message) (proto.Message, error) {
		left := time.Duration(-1)
		if dl, ok := ctx.Deadline(); ok {
			left = time.Until(dl)
		}
		ts.deadlines <- left
		<-ctx.Done()
		ts.ended <- ctx.Err()
		return nil, ctx.Err()
	})
	ts.srv.Handle(mFail, "fail", newBytes, func(context.Context, proto.Message) (proto.Message, error) {
		return nil, errors.New("the disk is on fire")
	})
	ts.srv.HandleMessage(mNote, "note", func(_ context.Context, p []byte) error {
		var v wrapperspb.StringValue
		if err := proto.Unmarshal(p, &v); err != nil {
			return err
		}
		ts.mu.Lock()
		ts.notes = append(ts.notes, v.GetValue())
		ts.mu.Unlock()
		return nil
	})
	ts.addr = serveOn(t, ts.srv)
	return ts
}

// serveOn serves srv on a loopback port until the test ends and returns
// the address.
func serveOn(t *testing.T, srv *Server) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return l.Addr().String()
}

func dial(t *testing.T, addr string, opts ClientOptions) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func echo(ctx context.Context, c *Client, s string) (string, error) {
	var resp wrapperspb.BytesValue
	err := c.Call(ctx, mEcho, wrapperspb.Bytes([]byte(s)), &resp)
	return string(resp.GetValue()), err
}

func reverse(s string) string {
	b := []byte(s)
	for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	return string(b)
}

func TestConcurrentCallsGetTheirOwnAnswers(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	c := dial(t, ts.addr, ClientOptions{})
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Go(func() {
			for i := range 100 {
				in := fmt.Sprintf("goroutine %d call %d %s", g, i, bytes.Repeat([]byte{'x'}, (g*100+i)%9000))
				out, err := echo(context.Background(), c, in)
				if err != nil {
					t.Error(err)
					return
				}
				if out != reverse(in) {
					t.Errorf("call %d/%d got another call's answer", g, i)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestDeadlineAndCancellationReachTheHandler(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	c := dial(t, ts.addr, ClientOptions{})

	// The deadline travels in the request.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	err := c.Call(ctx, mBlock, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call past its deadline: %v, want DeadlineExceeded", err)
	}
	if left := <-ts.deadlines; left <= 0 || left > 300*time.Millisecond {
		t.Fatalf("the handler's deadline was %v away, want (0, 300ms]", left)
	}
	if err := <-ts.ended; err == nil {
		t.Fatal("the handler's context did not end")
	}

	// A cancelled call without a deadline cancels the handler's context.
	ctx, cancel = context.WithCancel(context.Background())
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	if err := c.Call(ctx, mBlock, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: %v", err)
	}
	if left := <-ts.deadlines; left != -1 {
		t.Fatalf("a call without a deadline had one %v away", left)
	}
	select {
	case err := <-ts.ended:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("handler's context ended with %v, want Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("cancelling the call did not cancel the handler")
	}
	// The connection is still good.
	if out, err := echo(context.Background(), c, "abc"); err != nil || out != "cba" {
		t.Fatalf("echo after cancellations: %q, %v", out, err)
	}
}

// A failure answered once the call's context ended is the context's error,
// whichever of the answer and the context's end the call saw first.
func TestAFailureAfterTheContextEndedIsTheContexts(t *testing.T) {
	remote := &RemoteError{Method: mBlock, Msg: context.DeadlineExceeded.Error()}
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	cancelled, cancel2 := context.WithCancel(context.Background())
	cancel2()
	live, cancel3 := context.WithTimeout(context.Background(), time.Hour)
	defer cancel3()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		err  error
		want error
	}{
		{"past its deadline", expired, remote, context.DeadlineExceeded},
		{"cancelled", cancelled, remote, context.Canceled},
		{"live", live, remote, remote},
		{"answered", expired, nil, nil},
	} {
		if got := answered(tc.ctx, tc.err); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestServerErrorsAreRemoteErrors(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	c := dial(t, ts.addr, ClientOptions{})
	var re *RemoteError
	err := c.Call(context.Background(), mFail, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{})
	if !errors.As(err, &re) || re.Msg != "the disk is on fire" || IsUnknownMethod(err) {
		t.Fatalf("handler error: %v", err)
	}
	err = c.Call(context.Background(), 77, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{})
	if !errors.As(err, &re) || re.Msg != "unknown method 77" || !IsUnknownMethod(err) {
		t.Fatalf("unknown method: %v", err)
	}
	// A request that cannot be encoded fails alone.
	err = c.Call(context.Background(), mEcho, wrapperspb.String("\xff not UTF-8"), &wrapperspb.BytesValue{})
	if err == nil || errors.Is(err, ErrClosed) {
		t.Fatalf("unencodable request: %v", err)
	}
	if out, err := echo(context.Background(), c, "ok"); err != nil || out != "ko" {
		t.Fatalf("echo after errors: %q, %v", out, err)
	}
}

func TestUndecodableRequestGetsAnError(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	raw, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	payload := []byte{0xff, 0xff, 0xff}
	frame := append([]byte(Preface), appendHeader(nil, header{length: uint32(len(payload)), kind: kindRequest, method: mEcho, id: 9})...)
	if _, err := raw.Write(append(frame, payload...)); err != nil {
		t.Fatal(err)
	}
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(raw)
	if err := readPreface(r); err != nil {
		t.Fatal(err)
	}
	var bufs bufferPool
	h, p, err := readFrame(r, make([]byte, HeaderSize), DefaultMaxFrame, &bufs)
	if err != nil {
		t.Fatal(err)
	}
	if h.kind != kindError || h.id != 9 || !bytes.Contains(p, []byte("decode echo request")) {
		t.Fatalf("answer to an undecodable request: %s id %d %q", h.kind, h.id, p)
	}
}

func TestOversizedFrameClosesOnlyItsConnection(t *testing.T) {
	ts := startServer(t, ServerOptions{MaxFrame: 1024})
	c := dial(t, ts.addr, ClientOptions{})
	_, err := echo(context.Background(), c, string(make([]byte, 2000)))
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("oversized request: %v, want ErrClosed", err)
	}
	if _, err := echo(context.Background(), c, "x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("call on the closed connection: %v", err)
	}
	c2 := dial(t, ts.addr, ClientOptions{})
	if out, err := echo(context.Background(), c2, "fine"); err != nil || out != "enif" {
		t.Fatalf("another connection: %q, %v", out, err)
	}
}

func TestLostConnectionFailsPendingCallsAndPoolRedials(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	p := NewPool(ClientOptions{})
	defer p.Close()
	c, err := p.Get(context.Background(), ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- c.Call(context.Background(), mBlock, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{}) }()
	soon.Succeeds(t, 10*time.Second, func() error {
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.pending) == 0 {
			return errors.New("call not sent yet")
		}
		return nil
	})
	_ = c.conn.Close() // the network fails under the call
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("pending call: %v, want ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a pending call outlived its connection")
	}
	c2, err := p.Get(context.Background(), ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	if c2 == c {
		t.Fatal("the pool kept a broken client")
	}
	if out, err := echo(context.Background(), c2, "again"); err != nil || out != "niaga" {
		t.Fatalf("after redial: %q, %v", out, err)
	}

	// Nothing listens: every caller gets the dial error, not a hang.
	_ = ts.srv.Close()
	_ = c2.Close()
	if _, err := p.Get(context.Background(), ts.addr); err == nil {
		t.Fatal("dialled a closed server")
	}
}

func TestMessagesAreHandledInOrderBeforeLaterCalls(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	c := dial(t, ts.addr, ClientOptions{})
	var want []string
	for i := range 500 {
		s := fmt.Sprint(i)
		want = append(want, s)
		if err := c.Send(mNote, wrapperspb.String(s)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := echo(context.Background(), c, "barrier"); err != nil {
		t.Fatal(err)
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if fmt.Sprint(ts.notes) != fmt.Sprint(want) {
		t.Fatalf("notes out of order or missing: %d of %d", len(ts.notes), len(want))
	}
}

func TestMaxConcurrentBoundsRunningHandlers(t *testing.T) {
	srv := NewServer(ServerOptions{MaxConcurrent: 2})
	var running, peak atomic.Int32
	release := make(chan struct{})
	srv.Handle(mBlock, "block", newBytes, func(context.Context, proto.Message) (proto.Message, error) {
		n := running.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		<-release
		running.Add(-1)
		return wrapperspb.Bytes(nil), nil
	})
	c := dial(t, serveOn(t, srv), ClientOptions{})
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			if err := c.Call(context.Background(), mBlock, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{}); err != nil {
				t.Error(err)
			}
		})
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if running.Load() < 2 {
			return errors.New("handlers not started")
		}
		return nil
	})
	time.Sleep(50 * time.Millisecond) // would a third start?
	if p := peak.Load(); p != 2 {
		t.Fatalf("%d handlers ran at once, limit 2", p)
	}
	close(release)
	wg.Wait()
}

func TestSplitServesGRPCAndWireOnOnePort(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	wl, gl := Split(l)
	ts := &testServer{srv: NewServer(ServerOptions{})}
	ts.srv.Handle(mEcho, "echo", newBytes, func(_ context.Context, req proto.Message) (proto.Message, error) {
		return req, nil
	})
	go func() { _ = ts.srv.Serve(wl) }()
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, health.NewServer())
	go func() { _ = gs.Serve(gl) }()
	defer gs.Stop()
	defer ts.srv.Close()

	c := dial(t, l.Addr().String(), ClientOptions{})
	if out, err := echo(context.Background(), c, "same port"); err != nil || out != "same port" {
		t.Fatalf("wire on the shared port: %q, %v", out, err)
	}
	cc, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC on the shared port: %v, %v", resp, err)
	}

	// Something that is neither goes to the gRPC side, which hangs up.
	raw, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_, _ = raw.Write([]byte("GET / HTTP/1.1\r\nHost: cairn\r\n\r\n"))
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(raw); isTimeout(err) {
		t.Fatalf("a stranger's connection stayed open: %v", err)
	}
}

func TestAClientThatIsNotWireIsRefused(t *testing.T) {
	ts := startServer(t, ServerOptions{})
	raw, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_, _ = raw.Write([]byte("CAIRNW99 and then some garbage"))
	_ = raw.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(raw); isTimeout(err) {
		t.Fatalf("a connection with a wrong preface stayed open: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []header{
		{length: 0, kind: kindCancel, id: 1},
		{length: 4096, kind: kindRequest, method: 3, id: 1<<63 + 5, timeout: 1500 * time.Millisecond},
		{length: DefaultMaxFrame, kind: kindResponse, method: 255, id: 42},
	} {
		b := appendHeader(nil, h)
		if len(b) != HeaderSize {
			t.Fatalf("header is %d bytes", len(b))
		}
		got, err := decodeHeader(b, DefaultMaxFrame)
		if err != nil || got != h {
			t.Fatalf("decode(encode(%+v)) = %+v, %v", h, got, err)
		}
	}
	b := appendHeader(nil, header{length: DefaultMaxFrame + 1, kind: kindRequest})
	if _, err := decodeHeader(b, DefaultMaxFrame); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("oversized: %v", err)
	}
	b = appendHeader(nil, header{kind: 9})
	if _, err := decodeHeader(b, DefaultMaxFrame); !errors.Is(err, ErrProtocol) {
		t.Fatalf("unknown kind: %v", err)
	}
}

// FuzzServerConnection feeds arbitrary bytes after the preface to a
// server: it must answer or hang up, never panic or hang.
func FuzzServerConnection(f *testing.F) {
	req, _ := proto.Marshal(wrapperspb.Bytes([]byte("hello")))
	frame := append(appendHeader(nil, header{length: uint32(len(req)), kind: kindRequest, method: mEcho, id: 7}), req...)
	f.Add(frame)
	f.Add(append(appendHeader(nil, header{length: 3, kind: kindMessage, method: mNote}), 1, 2, 3))
	f.Add(appendHeader(nil, header{kind: kindCancel, id: 7}))
	f.Add([]byte{0, 0, 0, 1, 1, 1, 0, 0})
	srv := NewServer(ServerOptions{MaxFrame: 1 << 16})
	srv.Handle(mEcho, "echo", newBytes, func(_ context.Context, req proto.Message) (proto.Message, error) { return req, nil })
	srv.HandleMessage(mNote, "note", func(_ context.Context, p []byte) error {
		return proto.Unmarshal(p, &wrapperspb.StringValue{})
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	defer srv.Close()
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = c.Write(append([]byte(Preface), data...))
		_ = c.(*net.TCPConn).CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadAll(c); isTimeout(err) {
			t.Fatalf("the server neither answered nor hung up: %v", err)
		}
	})
}

// TestCallsReturnAtTheirDeadlineWhenThePeerStopsReading: a server that
// answers the preface and then reads nothing fills the socket buffers;
// every call still returns when its context ends, not at WriteTimeout.
func TestCallsReturnAtTheirDeadlineWhenThePeerStopsReading(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte(Preface))
		accepted <- c // and never read
	}()
	c := dial(t, l.Addr().String(), ClientOptions{WriteTimeout: time.Minute})
	defer func() { (<-accepted).Close() }()
	big := make([]byte, 1<<20)
	start := time.Now()
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			err := c.Call(ctx, mEcho, wrapperspb.Bytes(big), &wrapperspb.BytesValue{})
			if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, ErrClosed) {
				t.Errorf("call to a stalled peer: %v", err)
			}
		})
	}
	wg.Wait()
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("calls took %v to give up on a stalled peer", d)
	}
}

// TestCancellationArrivesBeforeLaterRequests: once Call returns for a
// cancelled request, the server has the cancellation ahead of any request
// the caller sends next (the client library relies on it: nothing of a
// cancelled write is proposed after a later write).
func TestCancellationArrivesBeforeLaterRequests(t *testing.T) {
	srv := NewServer(ServerOptions{})
	var blocked atomic.Pointer[context.Context]
	started := make(chan struct{}, 1)
	srv.Handle(mBlock, "block", newBytes, func(ctx context.Context, _ proto.Message) (proto.Message, error) {
		blocked.Store(&ctx)
		started <- struct{}{}
		<-ctx.Done()
		return nil, ctx.Err()
	})
	srv.Handle(mEcho, "echo", newBytes, func(context.Context, proto.Message) (proto.Message, error) {
		if p := blocked.Load(); p == nil || (*p).Err() == nil {
			return nil, errors.New("a later request arrived before the cancellation")
		}
		return wrapperspb.Bytes(nil), nil
	})
	c := dial(t, serveOn(t, srv), ClientOptions{})
	for range 50 {
		blocked.Store(nil)
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-started; cancel() }()
		if err := c.Call(ctx, mBlock, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{}); !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled call: %v", err)
		}
		if err := c.Call(context.Background(), mEcho, wrapperspb.Bytes(nil), &wrapperspb.BytesValue{}); err != nil {
			t.Fatal(err)
		}
	}
}
