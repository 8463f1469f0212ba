package wire

import (
	"bytes"
	"io"
	"net"
	"sync"
	"time"
)

// prefaceTimeout bounds how long an accepted connection may take to send
// its first bytes before it is dropped.
const prefaceTimeout = 10 * time.Second

// Split serves two protocols on one listener: connections that begin with
// the wire preface go to the first listener returned, every other one (gRPC)
// to the second, with the bytes read to tell them apart given back. l is
// closed when both are closed. A connection that sends nothing for 10s is
// dropped.
func Split(l net.Listener) (wireL, otherL net.Listener) {
	s := &split{l: l, done: make(chan struct{})}
	s.wire = &subListener{s: s, conns: make(chan net.Conn), done: make(chan struct{})}
	s.other = &subListener{s: s, conns: make(chan net.Conn), done: make(chan struct{})}
	go s.accept()
	return s.wire, s.other
}

type split struct {
	l           net.Listener
	wire, other *subListener
	done        chan struct{} // closed when l has failed or closed

	mu      sync.Mutex
	err     error
	closing int // sub-listeners closed
}

func (s *split) accept() {
	defer close(s.done)
	for {
		c, err := s.l.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			s.mu.Lock()
			s.err = err
			s.mu.Unlock()
			return
		}
		go s.route(c)
	}
}

// route reads a connection's first bytes and hands it to its listener.
func (s *split) route(c net.Conn) {
	head := make([]byte, len(Preface))
	_ = c.SetReadDeadline(time.Now().Add(prefaceTimeout))
	n, err := io.ReadFull(c, head)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		_ = c.Close()
		return
	}
	to := s.other
	if bytes.Equal(head[:n], []byte(Preface)) {
		to = s.wire
	}
	pc := &prefixConn{Conn: c, prefix: head[:n]}
	select {
	case to.conns <- pc:
	case <-to.done:
		_ = c.Close()
	case <-s.done:
		_ = c.Close()
	}
}

func (s *split) closed() {
	s.mu.Lock()
	s.closing++
	all := s.closing == 2
	s.mu.Unlock()
	if all {
		_ = s.l.Close()
	}
}

// subListener is one side of a Split.
type subListener struct {
	s     *split
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *subListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	case <-l.s.done:
		l.s.mu.Lock()
		err := l.s.err
		l.s.mu.Unlock()
		return nil, err
	}
}

func (l *subListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.s.closed()
	})
	return nil
}

func (l *subListener) Addr() net.Addr { return l.s.l.Addr() }

// prefixConn gives back the bytes read to route a connection.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// NetConn returns the connection under the routing wrapper (a TLS one when
// the listener split was a TLS listener).
func (c *prefixConn) NetConn() net.Conn { return c.Conn }

// ServeSplit serves w and a gRPC server g on one listener (see Split) in the
// background; stop them with w.Close and g.Stop.
func ServeSplit(l net.Listener, w *Server, g interface{ Serve(net.Listener) error }) {
	wl, gl := Split(l)
	go func() { _ = w.Serve(wl) }()
	go func() { _ = g.Serve(gl) }()
}
