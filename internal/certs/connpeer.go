package certs

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"sync"
	"time"
)

// A wire connection's caller is learned once. The certificate a connection
// was verified with does not change after its handshake (TLS 1.3 has no
// renegotiation), so the identity, its roles and the hosts it was checked
// against are kept with the connection instead of being worked out again
// for every request and Raft batch; only the expiry is checked each time.

// connIdentity is what a wire connection's certificate says, learned once.
type connIdentity struct {
	peer  Peer
	err   error               // ErrNoIdentity: the connection has no verified certificate
	chain []*x509.Certificate // the verified chain, checked for expiry at each use

	mu    sync.Mutex
	hosts map[string]error // VerifyHostname results (VerifyHost)
}

// maxHostsPerConn bounds the hosts one connection's checks are kept for.
const maxHostsPerConn = 64

type identityKey struct{}

// WireConnContext is the wire server's ServerOptions.ConnContext: it learns
// the caller of an accepted connection once, for PeerOf and VerifyHost to
// use with every request and message the connection carries.
func WireConnContext(ctx context.Context, c net.Conn) context.Context {
	id := &connIdentity{peer: Peer{Addr: c.RemoteAddr().String()}, err: ErrNoIdentity}
	if t, ok := tlsConn(c); ok {
		st := t.ConnectionState()
		id.peer, id.chain, id.err = identify(&st, id.peer.Addr)
	}
	return context.WithValue(ctx, identityKey{}, id)
}

// identityOf returns the identity WireConnContext learned, or nil.
func identityOf(ctx context.Context) *connIdentity {
	id, _ := ctx.Value(identityKey{}).(*connIdentity)
	return id
}

// current is the connection's caller now: no identity once a certificate
// of its chain expired.
func (id *connIdentity) current(now time.Time) (Peer, error) {
	if id.err != nil {
		return id.peer, id.err
	}
	return id.peer, unexpired(id.chain, now)
}

// VerifyHost checks that p's certificate is valid for host
// (x509.Certificate.VerifyHostname). On a wire connection whose caller
// WireConnContext learned, p being that caller, the result for each host
// is kept with the connection.
func VerifyHost(ctx context.Context, p Peer, host string) error {
	if p.Cert == nil {
		return fmt.Errorf("%s: %w", p, ErrNoIdentity)
	}
	id := identityOf(ctx)
	if id == nil || id.peer.Cert != p.Cert {
		return p.Cert.VerifyHostname(host)
	}
	id.mu.Lock()
	defer id.mu.Unlock()
	if err, ok := id.hosts[host]; ok {
		return err
	}
	err := p.Cert.VerifyHostname(host)
	if id.hosts == nil || len(id.hosts) >= maxHostsPerConn {
		id.hosts = map[string]error{}
	}
	id.hosts[host] = err
	return err
}
