package wire

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestInlineCallsRunOnTheReaderOnlyWhenAlone: a call of a HandleInline
// method that is its connection's only one runs on the reader (Inline);
// one that finds another call of the connection in progress runs on a
// goroutine; an inline run that would block (ErrWouldBlock) is run again
// on a goroutine, and every call gets its answer.
func TestInlineCallsRunOnTheReaderOnlyWhenAlone(t *testing.T) {
	const mRead, mWait Method = 10, 11
	srv := NewServer(ServerOptions{})
	type run struct {
		value  string
		inline bool
	}
	runs := make(chan run, 100)
	release, started := make(chan struct{}), make(chan struct{}, 1)
	srv.HandleInline(mRead, "read", newBytes, func(ctx context.Context, req proto.Message) (proto.Message, error) {
		v := string(req.(*wrapperspb.BytesValue).GetValue())
		runs <- run{v, Inline(ctx)}
		if v == "busy" && Inline(ctx) {
			return nil, ErrWouldBlock
		}
		return wrapperspb.Bytes([]byte(reverse(v))), nil
	})
	srv.Handle(mWait, "wait", newBytes, func(ctx context.Context, _ proto.Message) (proto.Message, error) {
		started <- struct{}{}
		select {
		case <-release:
			return wrapperspb.Bytes(nil), nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	})
	c := dial(t, serveOn(t, srv), ClientOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	call := func(m Method, v string) (string, error) {
		var resp wrapperspb.BytesValue
		err := c.Call(ctx, m, wrapperspb.Bytes([]byte(v)), &resp)
		return string(resp.GetValue()), err
	}
	next := func() run {
		select {
		case r := <-runs:
			return r
		case <-ctx.Done():
			t.Fatal("no handler ran")
			return run{}
		}
	}

	// Alone: inline.
	if got, err := call(mRead, "alone"); err != nil || got != "enola" {
		t.Fatalf("read alone: %q, %v", got, err)
	}
	if r := next(); !r.inline {
		t.Fatalf("a call alone on its connection ran on a goroutine")
	}

	// Would block: run again on a goroutine, answered once.
	if got, err := call(mRead, "busy"); err != nil || got != "ysub" {
		t.Fatalf("read that would block: %q, %v", got, err)
	}
	if r1, r2 := next(), next(); !r1.inline || r2.inline {
		t.Fatalf("a call that would block ran inline=%v then inline=%v, want true then false", r1.inline, r2.inline)
	}

	// Another call of the connection in progress: a goroutine, and the
	// reader stays free for it.
	waited := make(chan error, 1)
	go func() { _, err := call(mWait, ""); waited <- err }()
	<-started
	if got, err := call(mRead, "beside"); err != nil || got != "ediseb" {
		t.Fatalf("read beside a call in progress: %q, %v", got, err)
	}
	if r := next(); r.inline {
		t.Fatalf("a call beside another in progress ran on the reader")
	}
	close(release)
	if err := <-waited; err != nil {
		t.Fatalf("wait call: %v", err)
	}
	select {
	case r := <-runs:
		t.Fatalf("an extra handler run: %+v", r)
	default:
	}
}

// TestBurstsOfInlineCallsRunSideBySide: calls that reach the reader
// together run on goroutines, side by side, not one after another on the
// reader.
func TestBurstsOfInlineCallsRunSideBySide(t *testing.T) {
	const mRead Method = 10
	const n = 32
	srv := NewServer(ServerOptions{})
	var mu sync.Mutex
	running, peak, inline := 0, 0, 0
	srv.HandleInline(mRead, "read", newBytes, func(ctx context.Context, req proto.Message) (proto.Message, error) {
		mu.Lock()
		running++
		peak = max(peak, running)
		if Inline(ctx) {
			inline++
		}
		mu.Unlock()
		time.Sleep(20 * time.Millisecond) // a slow read: a page cache miss
		mu.Lock()
		running--
		mu.Unlock()
		return req, nil
	})
	c := dial(t, serveOn(t, srv), ClientOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var resp wrapperspb.BytesValue
			errs <- c.Call(ctx, mRead, wrapperspb.Bytes([]byte("x")), &resp)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if inline > n/4 || peak < 4 {
		t.Fatalf("%d of %d calls sent together ran on the reader, at most %d at once", inline, n, peak)
	}
}
