package wire

import (
	"context"
	"errors"

	"google.golang.org/protobuf/proto"
)

// Requests served on the connection's reader.
//
// A request's handler normally runs on a worker goroutine (workers.go), so
// that the connection's reader goes on to the next frame. For a short call
// that is most of its cost: handing it to a worker and the wake-up of
// another thread to run it (or the reader) take longer than serving a read
// from the page cache. A method registered with HandleInline therefore runs on the reader
// itself when no other request of the connection is in progress and no
// other frame has been read behind it (a burst of requests read together
// runs on workers, side by side); while it runs, the connection reads
// nothing else. Its handler sees Inline(ctx) and returns an error wrapping
// ErrWouldBlock instead of waiting for anything (a lock, a Raft round, a
// free slot); the server then runs it again, as usual, on a worker.
// What it cannot avoid, a system call that blocks (a read from the disk on a
// page cache miss), stalls the connection for that long.

// ErrWouldBlock is returned by a handler running inline (Inline(ctx)) that
// would have to wait to answer; the server then runs it on a goroutine.
var ErrWouldBlock = errors.New("wire: the call would block its connection's reader")

type inlineKey struct{}

// Inline reports whether a handler runs on its connection's reader, where
// it must not wait (see HandleInline).
func Inline(ctx context.Context) bool {
	v, _ := ctx.Value(inlineKey{}).(bool)
	return v
}

// HandleInline registers a call like Handle whose handler may run on the
// connection's reader when the connection has no other request in
// progress. The handler must then answer without waiting, or return an
// error wrapping ErrWouldBlock.
func (s *Server) HandleInline(m Method, name string, newReq func() proto.Message, h Handler) {
	s.register(m, &method{name: name, newReq: newReq, handler: h, inline: true})
}

// tryInline runs an inline method's handler on the reader when the request
// is the connection's only one in progress (its slot taken). It reports
// false when the request is left to a goroutine.
func (sc *serverConn) tryInline(h header, md *method, req proto.Message) bool {
	if !md.inline || len(sc.slots) != 1 {
		return false
	}
	// No cancel frame is read while the handler runs: the context ends
	// with the connection or at the request's deadline.
	ctx, cancel := context.WithValue(sc.ctx, inlineKey{}, true), context.CancelFunc(func() {})
	if h.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, h.timeout)
	}
	resp, err := md.handler(ctx, req)
	cancel()
	if errors.Is(err, ErrWouldBlock) {
		return false
	}
	sc.answer(h, resp, err)
	<-sc.slots
	return true
}
