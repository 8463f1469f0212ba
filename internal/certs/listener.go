package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
)

const (
	// handshakeTimeout bounds a TLS handshake on an accepted connection.
	handshakeTimeout = 10 * time.Second
	// maxHandshakes bounds the handshakes in progress; connections
	// accepted beyond it are closed at once, so that a flood of silent
	// connections cannot use up the process's file descriptors.
	maxHandshakes = 256
	// refusalLogEvery is how often, at most, a refused handshake is
	// logged (the others are counted in the next line).
	refusalLogEvery = time.Second
)

// NewListener returns a listener whose connections have completed a TLS
// handshake under s's server configuration (the caller's certificate
// verified). Handshakes run in their own goroutines (at most 256 at once),
// so a slow or silent caller never holds up others; a failed one is
// logged with the caller's address and the reason (at most once a second)
// and the connection closed. Accept errors other than the listener's
// closing are retried, as net/http and gRPC do.
func NewListener(inner net.Listener, s *Source, logger *slog.Logger) net.Listener {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &listener{inner: inner, cfg: s.ServerConfig(), log: logger, ctx: ctx, cancel: cancel,
		conns: make(chan net.Conn), slots: make(chan struct{}, maxHandshakes)}
	go l.accept()
	return l
}

type listener struct {
	inner  net.Listener
	cfg    *tls.Config
	log    *slog.Logger
	ctx    context.Context // ends at Close: handshakes in progress stop
	cancel context.CancelFunc
	conns  chan net.Conn
	slots  chan struct{}

	once sync.Once
	mu   sync.Mutex
	err  error
	// refusals since the last logged one, and when that was.
	refused    int
	lastLogged time.Time
}

func (l *listener) accept() {
	var backoff time.Duration
	for {
		c, err := l.inner.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || l.ctx.Err() != nil {
				l.fail(err)
				return
			}
			// Out of file descriptors, a connection reset before it was
			// accepted, ...: wait and go on.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed; retrying", "addr", l.inner.Addr().String(), "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
			case <-l.ctx.Done():
			}
			continue
		}
		backoff = 0
		select {
		case l.slots <- struct{}{}:
			go l.handshake(c)
		default:
			l.refuse(c.RemoteAddr().String(), errors.New("too many TLS handshakes in progress"))
			_ = c.Close()
		}
	}
}

func (l *listener) fail(err error) {
	l.mu.Lock()
	if l.err == nil {
		l.err = err
	}
	l.mu.Unlock()
	l.Close()
}

func (l *listener) handshake(c net.Conn) {
	defer func() { <-l.slots }()
	t := tls.Server(c, l.cfg)
	ctx, cancel := context.WithTimeout(l.ctx, handshakeTimeout)
	defer cancel()
	if err := t.HandshakeContext(ctx); err != nil {
		l.refuse(c.RemoteAddr().String(), err)
		_ = c.Close()
		return
	}
	select {
	case l.conns <- t:
	case <-l.ctx.Done():
		_ = t.Close()
	}
}

// refuse logs a refused connection, at most once a second.
func (l *listener) refuse(peer string, err error) {
	l.mu.Lock()
	l.refused++
	now := time.Now()
	if now.Sub(l.lastLogged) < refusalLogEvery {
		l.mu.Unlock()
		return
	}
	n := l.refused
	l.refused, l.lastLogged = 0, now
	l.mu.Unlock()
	l.log.Warn("TLS handshake refused", "peer", peer, "err", err, "refused_since_last_line", n)
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.ctx.Done():
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.err != nil && !errors.Is(l.err, net.ErrClosed) {
			return nil, l.err
		}
		return nil, net.ErrClosed
	}
}

func (l *listener) Close() error {
	var err error
	l.once.Do(func() {
		l.cancel()
		err = l.inner.Close()
	})
	return err
}

func (l *listener) Addr() net.Addr { return l.inner.Addr() }

// terminated are gRPC server credentials for connections whose TLS
// handshake a Listener already did: they hand gRPC the connection's
// verified state, so that calls see their caller's certificate.
type terminated struct{}

func (terminated) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	t, ok := tlsConn(c)
	if !ok {
		return nil, nil, errNotTLS
	}
	return c, credentials.TLSInfo{
		State:          t.ConnectionState(),
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
	}, nil
}

func (terminated) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("tls: server-side credentials used to dial")
}

func (terminated) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (terminated) Clone() credentials.TransportCredentials { return terminated{} }

// OverrideServerName is part of the TransportCredentials interface.
func (terminated) OverrideServerName(string) error { return nil }
