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

// handshakeTimeout bounds a TLS handshake on an accepted connection.
const handshakeTimeout = 10 * time.Second

// NewListener returns a listener whose connections have completed a TLS
// handshake under s's server configuration (the caller's certificate
// verified). Handshakes run in their own goroutines, so a slow or silent
// caller never holds up others; a failed one is logged with the caller's
// address and the reason, and the connection closed.
func NewListener(inner net.Listener, s *Source, logger *slog.Logger) net.Listener {
	if logger == nil {
		logger = slog.Default()
	}
	l := &listener{inner: inner, cfg: s.ServerConfig(), log: logger,
		conns: make(chan net.Conn), done: make(chan struct{})}
	go l.accept()
	return l
}

type listener struct {
	inner net.Listener
	cfg   *tls.Config
	log   *slog.Logger
	conns chan net.Conn
	done  chan struct{}

	once sync.Once
	mu   sync.Mutex
	err  error
}

func (l *listener) accept() {
	for {
		c, err := l.inner.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			l.mu.Lock()
			l.err = err
			l.mu.Unlock()
			l.Close()
			return
		}
		go l.handshake(c)
	}
}

func (l *listener) handshake(c net.Conn) {
	t := tls.Server(c, l.cfg)
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	defer cancel()
	if err := t.HandshakeContext(ctx); err != nil {
		l.log.Warn("TLS handshake refused", "peer", c.RemoteAddr().String(), "err", err)
		_ = c.Close()
		return
	}
	select {
	case l.conns <- t:
	case <-l.done:
		_ = t.Close()
	}
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.err != nil {
			return nil, l.err
		}
		return nil, net.ErrClosed
	}
}

func (l *listener) Close() error {
	var err error
	l.once.Do(func() {
		close(l.done)
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

//lint:ignore SA1019 part of the TransportCredentials interface.
func (terminated) OverrideServerName(string) error { return nil }
