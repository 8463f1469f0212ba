package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"cairn.io/cairn/blockdev"
)

// DefaultAddr is the address a gateway listens on when none is configured: the IANA NBD port on
// loopback.
const DefaultAddr = "127.0.0.1:10809"

// Defaults of Config.
const (
	DefaultMaxInFlight      = 64
	DefaultMaxInFlightBytes = 64 << 20
	DefaultHandshakeTimeout = 30 * time.Second
	DefaultWriteTimeout     = 30 * time.Second
	// DefaultInlineFor is a few times what a 4 KiB read of a Cairn volume takes end to end.
	DefaultInlineFor = time.Millisecond
)

// maxOptionLength bounds the data of one handshake option. Names are at most 4096 bytes, so no
// option the server understands comes near it; a larger one is treated as an attack and the
// connection is dropped.
const maxOptionLength = 64 << 10

// maxOptions bounds the options of one handshake. nbdinfo --list sends two per export.
const maxOptions = 10000

// Config configures a Server.
type Config struct {
	// Exports lists the exports and opens them by name, one Device per connection that enters
	// transmission and per NBD_OPT_INFO. Required. An Open that fails with an error wrapping
	// blockdev.ErrNotFound is answered with NBD_REP_ERR_UNKNOWN. An implementation that must not
	// open a store twice (opening a Cairn volume for writing fences earlier openers) shares one
	// open store among the Devices it returns. The server reads a Device's Size once per
	// connection and closes the Device after the connection's last request returned.
	Exports blockdev.Catalog
	// Logger receives the server's structured logs. Default: slog.Default().
	Logger *slog.Logger
	// DefaultExport names the export a client gets when it asks for the empty name. Empty: the
	// empty name is unknown.
	DefaultExport string
	// MaxPayload is the largest READ or WRITE a client may send, advertised as the maximum block
	// size. A multiple of 512, at least 4096. Default DefaultMaxPayload (32 MiB).
	MaxPayload uint32
	// MaxInFlight bounds the requests of one connection that run at once. Default 64.
	MaxInFlight int
	// InlineFor bounds how long a READ that arrived alone runs on the goroutine that read it
	// before the reading of the connection passes to another goroutine (see inline.go). Default
	// DefaultInlineFor; negative: every request runs on a worker goroutine.
	InlineFor time.Duration
	// MaxInFlightBytes bounds the READ and WRITE payload bytes of one connection held in memory at
	// once: a request that would exceed it is not read (nor are the ones behind it) until earlier
	// ones completed, so TCP flow control pushes back on the client. At least MaxPayload. Default
	// 64 MiB.
	MaxInFlightBytes int64
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN, telling clients they may spread the requests of
	// one export over several connections. Set it only when a Flush through any Device opened for a
	// name makes durable every write completed through all other Devices of that name (true when
	// they share one store, or when writes are durable on return as Cairn's are).
	MultiConn bool
	// HandshakeTimeout bounds how long the server waits for each step of a client's handshake and
	// for Exports calls made during it. Default 30 s.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds the sending of one reply; a client that stops reading is disconnected.
	// Default 30 s.
	WriteTimeout time.Duration
	// TLS, if set, lets clients upgrade a connection with NBD_OPT_STARTTLS (the server's
	// certificate, and whatever it asks of clients' certificates); RequireTLS then refuses every
	// option but NBD_OPT_STARTTLS and NBD_OPT_ABORT before the upgrade (NBD_REP_ERR_TLS_REQD), as
	// qemu-nbd and nbdkit do with --tls=require.
	TLS        *tls.Config
	RequireTLS bool
	// OnRequest, if set, is called after every transmission request has been answered, from the
	// goroutine that answered it. It must be fast and safe for concurrent use; it is the hook for
	// latency histograms.
	OnRequest func(RequestEvent)
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// TestingKnobs are hooks for tests.
type TestingKnobs struct {
	// OnInFlightBytes, when set, is called with a connection's payload bytes in flight each time a
	// request is admitted.
	OnInFlightBytes func(int64)
}

// RequestEvent describes one answered transmission request, for Config.OnRequest.
type RequestEvent struct {
	// Export is the name of the connection's export.
	Export string
	// Command is the request's command in lower case: "read", "write", "flush", "trim",
	// "write_zeroes", or the name of a refused command.
	Command string
	// Offset and Length are the request's range.
	Offset uint64
	Length uint32
	// Duration runs from the arrival of the request header to the end of the reply.
	Duration time.Duration
	// Errno is the protocol error value sent (0 on success): 5 EIO, 22 EINVAL, 28 ENOSPC, ...
	Errno uint32
}

// Stats is a snapshot of the server's counters. Fields named Total only grow (Prometheus counters);
// the others are gauges.
type Stats struct {
	ConnectionsTotal      uint64 // connections accepted
	Connections           int64  // connections open now
	HandshakesFailedTotal uint64 // connections that ended before transmission for a reason other than the client's choice
	ProtocolErrorsTotal   uint64 // connections dropped for a protocol violation
	InFlight              int64  // requests running now, all connections
	InFlightBytes         int64  // READ and WRITE payload bytes held now, all connections
	ReadsTotal            uint64
	WritesTotal           uint64
	FlushesTotal          uint64
	TrimsTotal            uint64
	WriteZeroesTotal      uint64
	ReadBytesTotal        uint64
	WrittenBytesTotal     uint64 // WRITE payload bytes
	RequestErrorsTotal    uint64 // requests answered with an error
	InlineTotal           uint64 // reads run on the goroutine that read them (Config.InlineFor)
	// DeadConnections is the number of connections that died (the client went away without
	// NBD_CMD_DISC, or a reply could not be sent) and still have requests in the backend, their
	// contexts cancelled.
	DeadConnections int64
	// WaitingConnections is the number of connections that completed the handshake but read no
	// request yet because a dead connection to the same export still has requests in the
	// backend.
	WaitingConnections int64
}

type counters struct {
	connectionsTotal, handshakesFailed, protocolErrors                atomic.Uint64
	connections, inFlight, inFlightBytes, dead, waiting               atomic.Int64
	reads, writes, flushes, trims, writeZeroes, readBytes, writeBytes atomic.Uint64
	requestErrors, inline                                             atomic.Uint64
}

// Server exports block devices over the NBD protocol (fixed newstyle handshake). Create it with
// NewServer, run it with Serve on one or more listeners, stop it with Close.
type Server struct {
	cfg    Config
	log    *slog.Logger
	ctx    context.Context // cancelled by Close; bounds Exports calls
	cancel context.CancelFunc
	stats  counters

	mu struct {
		sync.Mutex
		closed    bool
		listeners map[net.Listener]struct{}
		conns     map[*serverConn]struct{}
		// draining holds, per export name, the dead connections whose requests are still in
		// the backend; a new connection to the export waits for them (see transmit).
		draining map[string]*drain
	}
	wg sync.WaitGroup // one per connection goroutine
}

// NewServer checks cfg, fills in defaults and returns a server that is not yet listening.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Exports == nil {
		return nil, errors.New("nbd: config: Exports is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.MaxPayload < PreferredBlockSize || cfg.MaxPayload%MinBlockSize != 0 || cfg.MaxPayload > 1<<30 {
		return nil, fmt.Errorf("nbd: config: MaxPayload %d must be a multiple of %d between %d and 1 GiB",
			cfg.MaxPayload, MinBlockSize, PreferredBlockSize)
	}
	if cfg.MaxInFlight == 0 {
		cfg.MaxInFlight = DefaultMaxInFlight
	}
	if cfg.MaxInFlight < 1 {
		return nil, fmt.Errorf("nbd: config: MaxInFlight %d must be positive", cfg.MaxInFlight)
	}
	if cfg.InlineFor == 0 {
		cfg.InlineFor = DefaultInlineFor
	}
	if cfg.MaxInFlightBytes == 0 {
		cfg.MaxInFlightBytes = max(DefaultMaxInFlightBytes, int64(cfg.MaxPayload))
	}
	if cfg.MaxInFlightBytes < int64(cfg.MaxPayload) {
		return nil, fmt.Errorf("nbd: config: MaxInFlightBytes %d is below MaxPayload %d", cfg.MaxInFlightBytes, cfg.MaxPayload)
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.HandshakeTimeout < 0 || cfg.WriteTimeout < 0 {
		return nil, errors.New("nbd: config: timeouts must be positive")
	}
	if err := checkExportName(cfg.DefaultExport); err != nil {
		return nil, fmt.Errorf("nbd: config: DefaultExport: %w", err)
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "nbd")}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.mu.listeners = make(map[net.Listener]struct{})
	s.mu.conns = make(map[*serverConn]struct{})
	s.mu.draining = make(map[string]*drain)
	return s, nil
}

// ListenAndServe listens on addr (DefaultAddr when empty) and serves it until Close.
func (s *Server) ListenAndServe(addr string) error {
	if addr == "" {
		addr = DefaultAddr
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("nbd: listen %s: %w", addr, err)
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln and serves each in its own goroutine until Close, then returns
// ErrServerClosed. It closes ln when it returns. Serve may run on several listeners at once.
func (s *Server) Serve(ln net.Listener) error {
	if !s.trackListener(ln, true) {
		_ = ln.Close()
		return ErrServerClosed
	}
	defer s.trackListener(ln, false)
	defer ln.Close()
	s.log.Info("nbd: serving", "addr", ln.Addr().String())
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd: accept: %w", err)
			}
			// Out of file descriptors and the like: wait and try again, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("nbd: accept failed; retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
				return ErrServerClosed
			}
			continue
		}
		backoff = 0
		c := newServerConn(s, nc)
		if !s.trackConn(c, true) {
			_ = nc.Close()
			return ErrServerClosed
		}
		go c.serve()
	}
}

// Close stops the server: listeners close, handshakes in progress end, and every connection in
// transmission stops reading requests, lets the requests already received run to completion and
// answers them, then closes its socket and its export. Close returns when all that is done.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.mu.closed = true
	s.cancel()
	var errs []error
	for ln := range s.mu.listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for c := range s.mu.conns {
		c.stop("server closing")
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.log.Info("nbd: server closed")
	return errors.Join(errs...)
}

// DropExport ends the connections in transmission on the named export (for a volume that was
// deleted): each stops reading requests, answers the ones already received, closes its export and
// disconnects. A client that connects again goes through Exports.Open, which refuses a volume that
// is gone. It returns how many connections were told to stop.
func (s *Server) DropExport(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.mu.conns {
		c.dmu.Lock()
		match := c.exportName == name
		c.dmu.Unlock()
		if match {
			c.stop("export dropped")
			n++
		}
	}
	if n > 0 {
		s.log.Info("nbd: export dropped; its connections end", "export", name, "connections", n)
	}
	return n
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		ConnectionsTotal:      c.connectionsTotal.Load(),
		Connections:           c.connections.Load(),
		HandshakesFailedTotal: c.handshakesFailed.Load(),
		ProtocolErrorsTotal:   c.protocolErrors.Load(),
		InFlight:              c.inFlight.Load(),
		InFlightBytes:         c.inFlightBytes.Load(),
		ReadsTotal:            c.reads.Load(),
		WritesTotal:           c.writes.Load(),
		FlushesTotal:          c.flushes.Load(),
		TrimsTotal:            c.trims.Load(),
		WriteZeroesTotal:      c.writeZeroes.Load(),
		ReadBytesTotal:        c.readBytes.Load(),
		WrittenBytesTotal:     c.writeBytes.Load(),
		RequestErrorsTotal:    c.requestErrors.Load(),
		InlineTotal:           c.inline.Load(),
		DeadConnections:       c.dead.Load(),
		WaitingConnections:    c.waiting.Load(),
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.closed
}

func (s *Server) trackListener(ln net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !add {
		delete(s.mu.listeners, ln)
		return true
	}
	if s.mu.closed {
		return false
	}
	s.mu.listeners[ln] = struct{}{}
	return true
}

// trackConn registers (add) or forgets a connection. Registration fails once the server is
// closed; a registered connection counts in wg until it is forgotten.
func (s *Server) trackConn(c *serverConn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !add {
		delete(s.mu.conns, c)
		s.wg.Done()
		return true
	}
	if s.mu.closed {
		return false
	}
	s.mu.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

// drain counts the dead connections of one export whose requests are still in the backend; done
// is closed when the last of them returned.
type drain struct {
	n    int
	done chan struct{}
}

// drainState is where a connection stands in the draining of its export's dead connections.
type drainState int

const (
	drainNone     drainState = iota // not counted in a drain
	drainCounted                    // counted: its requests may still be in the backend
	drainFinished                   // its requests all returned; never counted again
)

// beginDrain counts c, a dead connection of export name whose requests are being cancelled, in
// the export's drain, once.
func (s *Server) beginDrain(c *serverConn, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.beginDrainLocked(c, name)
}

func (s *Server) beginDrainLocked(c *serverConn, name string) {
	if c.drain != drainNone {
		return
	}
	c.drain = drainCounted
	d := s.mu.draining[name]
	if d == nil {
		d = &drain{done: make(chan struct{})}
		s.mu.draining[name] = d
	}
	d.n++
	s.stats.dead.Add(1)
}

// endDrain records that every request of c, a connection of export name, has returned: if c
// was counted in the export's drain, the drain ends with the last such connection.
func (s *Server) endDrain(c *serverConn, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	counted := c.drain == drainCounted
	c.drain = drainFinished
	if !counted {
		return
	}
	d := s.mu.draining[name]
	s.stats.dead.Add(-1)
	if d.n--; d.n == 0 {
		delete(s.mu.draining, name)
		close(d.done)
	}
}

// reapHungUp is called as connection c begins transmission on export name. Another connection
// to the export whose client hung up may not have noticed yet: its reader may not be reading
// (its limiter is full, or it is yet to run), with requests the client sent before it died
// still unread in the socket. Those requests must not run after c's. So every such connection
// (its socket has the peer's FIN or RST) is counted in the export's drain now, before c's
// waitDrained, and killed: it reads nothing more, runs nothing it reads from now on, and ends
// its drain once its requests in flight returned. A connection whose reader read NBD_CMD_DISC
// has nothing unread that may run: it is left to complete its requests, as a disconnect does,
// even when its client half-closed the socket after the disconnect.
func (s *Server) reapHungUp(c *serverConn, name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for o := range s.mu.conns {
		if o == c {
			continue
		}
		o.dmu.Lock()
		match, nc := o.exportName == name && !o.disc, o.nc
		o.dmu.Unlock()
		if !match || o.drain != drainNone || !peerHungUp(nc) {
			continue
		}
		o.log.Info("nbd: a new connection to the export found this connection's client gone; closing it")
		s.beginDrainLocked(o, name)
		o.kill("the client hung up")
		o.ioCancel() // as for any dead connection: its requests in the backend are cancelled
	}
}

// drainLogInterval is how often a connection waiting for a dead connection's requests says so.
const drainLogInterval = 10 * time.Second

// waitDrained blocks until no dead connection of export name has requests in the backend. There
// is no time limit: a write of the dead connection that landed after a write of this one would
// overwrite newer data with older. It returns false when the server closes or c is stopped
// first.
func (s *Server) waitDrained(c *serverConn, name string) bool {
	var t *time.Ticker
	start := time.Now()
	for {
		s.mu.Lock()
		d := s.mu.draining[name]
		s.mu.Unlock()
		if d == nil {
			return true
		}
		if t == nil {
			s.stats.waiting.Add(1)
			defer s.stats.waiting.Add(-1)
			t = time.NewTicker(drainLogInterval)
			defer t.Stop()
			c.log.Info("nbd: waiting for the requests of a dead connection to this export to return")
		}
		select {
		case <-d.done:
		case <-t.C:
			c.log.Warn("nbd: still waiting for the requests of a dead connection to this export",
				"waited", time.Since(start).Round(time.Second).String())
		case <-s.ctx.Done():
			return false
		case <-c.stopCh:
			return false
		}
	}
}
