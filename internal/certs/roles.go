package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Role is what a certificate allows its holder to do in a Cairn cluster.
// A certificate names its roles as organizational units of its subject
// (OU=chunkserver); one certificate may hold several.
type Role string

// The roles.
const (
	// RoleMDS: the metadata server. It creates and removes copysets and
	// runs operators on chunkservers.
	RoleMDS Role = "mds"
	// RoleChunkServer: a chunkserver. It registers and reports to the
	// MDS and exchanges Raft traffic with other chunkservers.
	RoleChunkServer Role = "chunkserver"
	// RoleClient: a process doing volume IO (the gateway, the client
	// library, the CSI node plugin): it opens volumes and reads and writes
	// chunks under a volume epoch.
	RoleClient Role = "client"
	// RoleOperator: an administrator (cairn-ops, the CSI controller): it
	// may also change the topology and create, delete and publish
	// volumes.
	RoleOperator Role = "operator"
)

// Roles lists every role.
var Roles = []Role{RoleMDS, RoleChunkServer, RoleClient, RoleOperator}

// RolesOf returns the Cairn roles a certificate names.
func RolesOf(c *x509.Certificate) []Role {
	if c == nil {
		return nil
	}
	var out []Role
	for _, ou := range c.Subject.OrganizationalUnit {
		if r := Role(strings.ToLower(strings.TrimSpace(ou))); slices.Contains(Roles, r) && !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	return out
}

// ErrNoIdentity is returned for a caller that presented no verified
// certificate (a plaintext connection to a server that runs with TLS
// cannot get this far; a server without TLS has no identities).
var ErrNoIdentity = errors.New("caller presented no certificate")

// Peer is a caller as a server sees it.
type Peer struct {
	Addr  string
	Name  string // the certificate's subject common name
	Roles []Role
	// Cert is the caller's verified certificate (nil without one).
	Cert *x509.Certificate
}

func (p Peer) String() string {
	if p.Name == "" {
		return p.Addr
	}
	return fmt.Sprintf("%s (%s, roles %v)", p.Addr, p.Name, p.Roles)
}

// PeerOf returns the caller of a gRPC call or of a wire request or
// message (the connection's verified certificate), or ErrNoIdentity.
func PeerOf(ctx context.Context) (Peer, error) {
	if id := identityOf(ctx); id != nil {
		return id.current(time.Now())
	}
	if st, addr, ok := wireState(ctx); ok {
		return peerFromState(st, addr)
	}
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Peer{}, ErrNoIdentity
	}
	addr := ""
	if p.Addr != nil {
		addr = p.Addr.String()
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return Peer{Addr: addr}, ErrNoIdentity
	}
	return peerFromState(&info.State, addr)
}

func peerFromState(st *tls.ConnectionState, addr string) (Peer, error) {
	p, chain, err := identify(st, addr)
	if err != nil {
		return p, err
	}
	return p, unexpired(chain, time.Now())
}

// identify returns the caller a TLS state names and its verified chain,
// or ErrNoIdentity.
func identify(st *tls.ConnectionState, addr string) (Peer, []*x509.Certificate, error) {
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return Peer{Addr: addr}, nil, ErrNoIdentity
	}
	chain := st.VerifiedChains[0]
	leaf := chain[0]
	return Peer{Addr: addr, Name: leaf.Subject.CommonName, Roles: RolesOf(leaf), Cert: leaf}, chain, nil
}

// unexpired returns ErrNoIdentity when a certificate of chain expired by
// now. Connections outlive certificates: one whose certificate (or an
// authority above it) has expired since the handshake has no identity
// left; its holder must connect again with a current one.
func unexpired(chain []*x509.Certificate, now time.Time) error {
	for _, c := range chain {
		if now.After(c.NotAfter) {
			return fmt.Errorf("%w: the certificate %q of this connection expired at %s", ErrNoIdentity, c.Subject.CommonName, c.NotAfter.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// tlsConn finds the TLS connection under c (c itself, or what a wrapper
// such as the wire protocol's listener split returns from NetConn).
func tlsConn(c net.Conn) (*tls.Conn, bool) {
	for c != nil {
		if t, ok := c.(*tls.Conn); ok {
			return t, true
		}
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return nil, false
		}
		c = u.NetConn()
	}
	return nil, false
}
