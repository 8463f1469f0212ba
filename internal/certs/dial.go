package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// DialOption is the gRPC transport security of a connection this process
// opens to a server of the given role: TLS with s's identity, the server's
// certificate naming that role, or plaintext when s is nil (--insecure).
func DialOption(s *Source, server Role) grpc.DialOption {
	if s == nil {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	return grpc.WithTransportCredentials(clientCreds{s, server})
}

// Dialer opens the connections of the wire protocol to servers of the
// given role: TCP with a 5 s timeout, then TLS with s's identity unless s
// is nil.
func Dialer(s *Source, server Role) func(ctx context.Context, addr string) (net.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	if s == nil {
		return func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	return func(ctx context.Context, addr string) (net.Conn, error) {
		if err := s.checkOwn(); err != nil {
			return nil, err
		}
		// A configuration per connection: the authorities of the moment,
		// and the server verified against the host of addr.
		td := &tls.Dialer{NetDialer: d, Config: s.clientConfigFor(server)}
		return td.DialContext(ctx, "tcp", addr)
	}
}

// clientCreds are gRPC client credentials that build each connection's TLS
// configuration when it is made, so that rotated certificates and
// authorities are used from then on.
type clientCreds struct {
	s      *Source
	server Role
}

func (c clientCreds) ClientHandshake(ctx context.Context, authority string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	if err := c.s.checkOwn(); err != nil {
		return nil, nil, err
	}
	cfg := c.s.clientConfigFor(c.server)
	host, _, err := net.SplitHostPort(authority)
	if err != nil {
		host = authority
	}
	cfg.ServerName = host
	return credentials.NewTLS(cfg).ClientHandshake(ctx, authority, conn)
}

func (clientCreds) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("tls: client credentials used to serve")
}

func (clientCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (c clientCreds) Clone() credentials.TransportCredentials { return clientCreds{c.s, c.server} }

// OverrideServerName is part of the TransportCredentials interface.
func (clientCreds) OverrideServerName(string) error { return nil }

// clientConfigFor is ClientConfig, also requiring that the server's
// certificate name the role: a client's certificate valid for the host
// (on a shared machine) cannot stand in for the MDS or a chunkserver.
func (s *Source) clientConfigFor(server Role) *tls.Config {
	cfg := s.ClientConfig()
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("tls: the server presented no certificate")
		}
		leaf := cs.PeerCertificates[0]
		if !slices.Contains(RolesOf(leaf), server) {
			return fmt.Errorf("tls: the server's certificate (%s) does not have the %s role", leaf.Subject, server)
		}
		return nil
	}
	return cfg
}
