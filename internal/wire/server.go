package wire

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
)

// Handler serves one call: req is the decoded request; the returned message
// is the response. An error is sent to the client as a RemoteError.
type Handler func(ctx context.Context, req proto.Message) (proto.Message, error)

// MessageHandler handles one one-way message, in order, on the connection's
// reader goroutine: it must not block. ctx carries the connection (ConnOf)
// and ends when it closes; payload is valid only during the call. An error
// closes the connection.
type MessageHandler func(ctx context.Context, payload []byte) error

// ServerOptions configure a Server.
type ServerOptions struct {
	// MaxFrame bounds a received frame's payload (default DefaultMaxFrame);
	// a larger frame closes the connection.
	MaxFrame int
	// MaxConcurrent bounds the requests served at once per connection
	// (default 1024); the connection is not read while that many run.
	MaxConcurrent int
	// MaxPending bounds the response bytes waiting to be written per
	// connection (default 4 MiB); handlers wait beyond it.
	MaxPending int
	// WriteTimeout bounds one write to a connection (default 30s); a
	// client that does not read for that long is disconnected.
	WriteTimeout time.Duration
	// Authorize, if set, is asked before every request and one-way
	// message with the method's registered name; ctx carries the
	// connection (ConnOf). A refused request is answered with the error;
	// a refused message closes the connection.
	Authorize func(ctx context.Context, method string) error
	// ConnContext, if set, derives the context of a connection's requests
	// and messages (and of Authorize) from ctx once the connection's
	// preface arrived: what is learned of a connection once is kept there
	// (as net/http's Server.ConnContext).
	ConnContext func(ctx context.Context, c net.Conn) context.Context
	Logger      *slog.Logger
}

// connKey is the context key of the connection a request arrived on.
type connKey struct{}

// ConnOf returns the connection a request or message arrived on, from
// the context a Server gives its handlers (and Authorize), or nil.
func ConnOf(ctx context.Context) net.Conn {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	return c
}

func (o *ServerOptions) setDefaults() {
	if o.MaxFrame <= 0 {
		o.MaxFrame = DefaultMaxFrame
	}
	if o.MaxConcurrent <= 0 {
		o.MaxConcurrent = 1024
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 4 << 20
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 30 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

type method struct {
	name    string
	newReq  func() proto.Message
	handler Handler
	message MessageHandler
	inline  bool // may run on the connection's reader (inline.go)
}

// Server serves wire connections. Register methods before Serve.
type Server struct {
	opts    ServerOptions
	methods [256]*method
	bufs    bufferPool

	mu     sync.Mutex
	lis    []net.Listener
	conns  map[*serverConn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// NewServer returns a Server with no methods.
func NewServer(opts ServerOptions) *Server {
	opts.setDefaults()
	return &Server{opts: opts, conns: map[*serverConn]struct{}{}}
}

// Handle registers a call: newReq makes an empty request message to decode
// into; name is used in logs and errors.
func (s *Server) Handle(m Method, name string, newReq func() proto.Message, h Handler) {
	s.register(m, &method{name: name, newReq: newReq, handler: h})
}

// HandleMessage registers a one-way message.
func (s *Server) HandleMessage(m Method, name string, h MessageHandler) {
	s.register(m, &method{name: name, message: h})
}

// Methods returns the names of the registered requests and messages.
func (s *Server) Methods() []string {
	var out []string
	for _, md := range s.methods {
		if md != nil {
			out = append(out, md.name)
		}
	}
	return out
}

func (s *Server) register(m Method, md *method) {
	if s.methods[m] != nil {
		panic(fmt.Sprintf("wire: method %d registered twice (%s, %s)", m, s.methods[m].name, md.name))
	}
	s.methods[m] = md
}

// Serve accepts connections on l until l fails or the server closes; it
// returns nil after Close.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = l.Close()
		return nil
	}
	s.lis = append(s.lis, l)
	s.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		s.ServeConn(c)
	}
}

// ServeConn serves one accepted connection in the background; the server
// owns it from now on.
func (s *Server) ServeConn(c net.Conn) {
	sc := &serverConn{s: s, conn: c, cancels: map[uint64]context.CancelFunc{}}
	sc.ctx, sc.cancel = context.WithCancel(context.WithValue(context.Background(), connKey{}, c))
	sc.done = sc.ctx.Done() // the connection's own end, whatever ConnContext derives
	sc.w = newWriter(c, s.opts.MaxPending, s.opts.WriteTimeout)
	sc.slots = make(chan struct{}, s.opts.MaxConcurrent)
	sc.work = make(chan job)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = c.Close()
		return
	}
	s.conns[sc] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go sc.serve()
}

// Close closes the listeners and every connection, cancels the calls in
// progress and waits for their handlers to return.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for _, l := range s.lis {
		_ = l.Close()
	}
	for sc := range s.conns {
		sc.close(ErrClosed)
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// Shutdown stops accepting connections, lets the calls in progress finish
// for at most d, then closes like Close.
func (s *Server) Shutdown(d time.Duration) error {
	s.mu.Lock()
	for _, l := range s.lis {
		_ = l.Close()
	}
	s.lis = nil
	s.mu.Unlock()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && s.busy() {
		time.Sleep(5 * time.Millisecond)
	}
	return s.Close()
}

// busy tells whether any connection has a call in progress.
func (s *Server) busy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sc := range s.conns {
		if len(sc.slots) > 0 {
			return true
		}
	}
	return false
}

// serverConn is one client connection.
type serverConn struct {
	s       *Server
	conn    net.Conn
	w       *writer
	ctx     context.Context // ends when the connection closes
	cancel  context.CancelFunc
	done    <-chan struct{} // closed when the connection closes (cancel)
	slots   chan struct{}   // requests in progress
	running sync.WaitGroup  // workers (workers.go)
	work    chan job        // hands a request to an idle worker
	idle    atomic.Int32    // workers waiting for a request
	workers atomic.Int32    // workers started and not yet gone

	mu       sync.Mutex
	cancels  map[uint64]context.CancelFunc // of the requests in progress
	closeErr error
}

func (sc *serverConn) close(err error) {
	sc.mu.Lock()
	if sc.closeErr == nil {
		sc.closeErr = err
	}
	sc.mu.Unlock()
	sc.cancel()
	sc.w.fail(ErrClosed)
	_ = sc.conn.Close()
}

func (sc *serverConn) serve() {
	s := sc.s
	defer s.wg.Done()
	err := sc.readLoop()
	sc.close(err)
	sc.running.Wait()
	s.mu.Lock()
	delete(s.conns, sc)
	s.mu.Unlock()
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !errors.Is(err, ErrClosed) {
		s.opts.Logger.Warn("wire connection closed", "peer", sc.conn.RemoteAddr().String(), "err", err)
	}
}

func (sc *serverConn) readLoop() error {
	s := sc.s
	r := bufio.NewReaderSize(sc.conn, 64<<10)
	_ = sc.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := readPreface(r); err != nil {
		return err
	}
	_ = sc.conn.SetReadDeadline(time.Time{})
	if f := s.opts.ConnContext; f != nil {
		sc.ctx = f(sc.ctx, sc.conn) // sc.ctx is read by this goroutine only
	}
	if err := sc.w.sendPreface(); err != nil {
		return err
	}
	hdr := make([]byte, HeaderSize)
	for {
		h, payload, err := readFrame(r, hdr, s.opts.MaxFrame, &s.bufs)
		if err != nil {
			return err
		}
		switch h.kind {
		case kindRequest:
			// A request may run on this goroutine only when no other
			// frame is already read and waiting behind it (inline.go).
			err = sc.request(h, payload, r.Buffered() == 0)
		case kindMessage:
			err = sc.message(h, payload)
		case kindCancel:
			sc.mu.Lock()
			if cancel := sc.cancels[h.id]; cancel != nil {
				cancel()
			}
			sc.mu.Unlock()
		default:
			err = fmt.Errorf("%w: a client sent a %s frame", ErrProtocol, h.kind)
		}
		s.bufs.put(payload)
		if err != nil {
			return err
		}
	}
}

// message runs a one-way message's handler.
func (sc *serverConn) message(h header, payload []byte) error {
	md := sc.s.methods[h.method]
	if md == nil || md.message == nil {
		return fmt.Errorf("%w: message of unknown method %d", ErrProtocol, h.method)
	}
	if auth := sc.s.opts.Authorize; auth != nil {
		if err := auth(sc.ctx, md.name); err != nil {
			return fmt.Errorf("message %s refused: %w", md.name, err)
		}
	}
	if err := md.message(sc.ctx, payload); err != nil {
		return fmt.Errorf("message %s: %w", md.name, err)
	}
	return nil
}

// request decodes a request and starts its handler; it waits for a slot
// when MaxConcurrent are running.
func (sc *serverConn) request(h header, payload []byte, last bool) error {
	md := sc.s.methods[h.method]
	if md == nil || md.handler == nil {
		return sc.w.send(context.Background(), header{kind: kindError, method: h.method, id: h.id}, nil, unknownMethod(h.method))
	}
	if auth := sc.s.opts.Authorize; auth != nil {
		if err := auth(sc.ctx, md.name); err != nil {
			return sc.w.send(context.Background(), header{kind: kindError, method: h.method, id: h.id}, nil, err.Error())
		}
	}
	req := md.newReq()
	if err := proto.Unmarshal(payload, req); err != nil {
		return sc.w.send(context.Background(), header{kind: kindError, method: h.method, id: h.id}, nil, fmt.Sprintf("decode %s request: %v", md.name, err))
	}
	select {
	case sc.slots <- struct{}{}:
	case <-sc.ctx.Done():
		return ErrClosed
	}
	if last && sc.tryInline(h, md, req) {
		return nil
	}
	ctx, cancel := sc.ctx, context.CancelFunc(nil)
	if h.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, h.timeout)
	} else {
		ctx, cancel = context.WithCancel(ctx)
	}
	sc.mu.Lock()
	sc.cancels[h.id] = cancel
	sc.mu.Unlock()
	sc.dispatch(job{ctx: ctx, cancel: cancel, h: h, md: md, req: req})
	return nil
}

// answer sends a handler's response, or its error.
func (sc *serverConn) answer(h header, resp proto.Message, err error) {
	if err == nil {
		err = sc.w.send(context.Background(), header{kind: kindResponse, method: h.method, id: h.id}, resp, "")
		if err != nil && connectionFailed(err) {
			err = nil // the connection is gone; nobody to tell
		}
	}
	if err != nil {
		_ = sc.w.send(context.Background(), header{kind: kindError, method: h.method, id: h.id}, nil, err.Error())
	}
}
