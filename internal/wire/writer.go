package wire

import (
	"context"
	"encoding/binary"
	"errors"
	"math/bits"
	"net"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
)

// writer sends frames on a connection without a goroutine of its own: a
// sender appends its frame to the pending buffer and, when nobody else is
// writing, writes the buffer (and whatever others append meanwhile) until it
// is empty. Frames that become ready while a write is in progress leave
// together in the next write system call.
type writer struct {
	conn         net.Conn
	maxPending   int           // bytes a sender may find pending before it waits
	writeTimeout time.Duration // bound on one write system call

	mu       sync.Mutex
	space    chan struct{} // closed (and replaced) when a write completes or the writer fails
	pending  []byte
	spare    []byte
	flushing bool
	err      error
}

func newWriter(conn net.Conn, maxPending int, writeTimeout time.Duration) *writer {
	return &writer{conn: conn, maxPending: maxPending, writeTimeout: writeTimeout, space: make(chan struct{})}
}

// send encodes one frame (header h, payload msg or text) and writes it, or
// leaves it to the goroutine already writing. It returns the writer's error
// once it has failed; a failed writer stays failed. When ctx ends while the
// frame waits for room, send returns ctx's error and the frame is not sent;
// when it ends while this sender is writing, the write is cut short and the
// writer fails (a peer that takes no bytes for that long is not healthy).
func (w *writer) send(ctx context.Context, h header, msg proto.Message, text string) error {
	return w.write(ctx, true, h, msg, text)
}

// sendPreface writes the connection's preface.
func (w *writer) sendPreface() error {
	return w.write(context.Background(), false, header{}, nil, Preface)
}

// write appends a frame (framed) or raw text and writes what is pending.
func (w *writer) write(ctx context.Context, framed bool, h header, msg proto.Message, text string) error {
	w.mu.Lock()
	for w.err == nil && w.flushing && len(w.pending) >= w.maxPending {
		space := w.space
		w.mu.Unlock()
		select {
		case <-space:
		case <-ctx.Done():
			return ctx.Err()
		}
		w.mu.Lock()
	}
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return err
	}
	start := len(w.pending)
	var err error
	switch {
	case !framed:
		w.pending = append(w.pending, text...)
	case msg != nil:
		w.pending = appendHeader(w.pending, h)
		w.pending, err = proto.MarshalOptions{}.MarshalAppend(w.pending, msg)
	default:
		w.pending = appendHeader(w.pending, h)
		w.pending = append(w.pending, text...)
	}
	if err != nil {
		w.pending = w.pending[:start]
		w.mu.Unlock()
		return &encodeError{err}
	}
	if framed {
		binary.BigEndian.PutUint32(w.pending[start:], uint32(len(w.pending)-start-HeaderSize))
	}
	if w.flushing {
		w.mu.Unlock()
		return nil
	}
	w.flushing = true
	var stop func() bool
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() { _ = w.conn.SetWriteDeadline(time.Now()) })
	}
	err = w.flushLocked(ctx)
	w.mu.Unlock()
	if stop != nil {
		stop()
	}
	return err
}

// post appends a small frame without waiting for room or for the write:
// frames sent after it still leave after it. When nobody is writing, a
// goroutine of its own writes what is pending.
func (w *writer) post(h header) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return
	}
	w.pending = appendHeader(w.pending, h)
	if !w.flushing {
		w.flushing = true
		go func() {
			w.mu.Lock()
			_ = w.flushLocked(context.Background())
			w.mu.Unlock()
		}()
	}
}

// flushLocked writes what is pending until nothing is, as the one writer
// (w.flushing set by the caller, cleared here); it is called with w.mu held
// and returns with it held.
func (w *writer) flushLocked(ctx context.Context) error {
	for len(w.pending) > 0 && w.err == nil {
		b := w.pending
		w.pending, w.spare = w.spare[:0], nil
		w.mu.Unlock()
		if w.writeTimeout > 0 {
			_ = w.conn.SetWriteDeadline(time.Now().Add(w.writeTimeout))
		}
		if ctx.Err() != nil {
			_ = w.conn.SetWriteDeadline(time.Now())
		}
		_, err := w.conn.Write(b)
		w.mu.Lock()
		if err != nil {
			w.err = err
		}
		if cap(b) <= 2*w.maxPending {
			w.spare = b[:0]
		}
		close(w.space)
		w.space = make(chan struct{})
	}
	w.flushing = false
	return w.err
}

// fail makes every later send fail with err and wakes waiting senders.
func (w *writer) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
		close(w.space)
		w.space = make(chan struct{})
	}
	w.mu.Unlock()
}

// encodeError is a message that could not be encoded: that frame fails,
// the connection does not.
type encodeError struct{ err error }

func (e *encodeError) Error() string { return "wire: encode: " + e.err.Error() }
func (e *encodeError) Unwrap() error { return e.err }

// connectionFailed tells whether a send error ended the connection.
func connectionFailed(err error) bool {
	var ee *encodeError
	return !errors.As(err, &ee)
}

// bufferPool recycles payload buffers in power-of-two size classes from
// 4 KiB up, so that reading a frame does not allocate in the steady state.
type bufferPool struct {
	classes [24]sync.Pool // 4 KiB << i
}

const minBufShift = 12

func classOf(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// get returns a buffer of length n.
func (p *bufferPool) get(n int) []byte {
	c := classOf(n)
	if c >= len(p.classes) {
		return make([]byte, n)
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+minBufShift))
}

// put returns a buffer obtained from get; nothing may use it afterwards.
func (p *bufferPool) put(b []byte) {
	c := classOf(cap(b))
	if c >= len(p.classes) || cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:0]
	p.classes[c].Put(&b)
}
