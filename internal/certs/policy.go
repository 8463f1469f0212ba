package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"slices"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/internal/wire"
)

// Policy says which roles may call which method of a server. A method is
// named as gRPC names it ("/cairn.mds.v1.Topology/CreatePool") or as the
// wire protocol's handlers are registered ("write chunk").
type Policy struct {
	// Methods maps a method to the roles allowed to call it.
	Methods map[string][]Role
	// Default are the roles allowed to call a method not in Methods.
	Default []Role
}

// Check returns nil when the caller in ctx may call method: a status error
// Unauthenticated without a verified certificate, PermissionDenied with
// one of the wrong role.
func (p *Policy) Check(ctx context.Context, method string) error {
	caller, err := PeerOf(ctx)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "%s: %s: %v", method, caller.Addr, err)
	}
	allowed, ok := p.Methods[method]
	if !ok {
		allowed = p.Default
	}
	for _, r := range caller.Roles {
		if slices.Contains(allowed, r) {
			return nil
		}
	}
	return status.Errorf(codes.PermissionDenied, "%s is not allowed to %s (it needs one of the roles %v)", caller, method, allowed)
}

// ServerOptions are the gRPC server options of a server that runs with TLS
// under p: connections come from a Listener (the handshake is done), and
// every call is checked against p.
func (p *Policy) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(terminated{}),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := p.Check(ctx, info.FullMethod); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := p.Check(ss.Context(), info.FullMethod); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
}

// WireAuthorize is the wire server's ServerOptions.Authorize under p.
func (p *Policy) WireAuthorize() func(ctx context.Context, method string) error {
	return p.Check
}

// wireState returns the TLS state of the wire connection a request or
// message arrived on.
func wireState(ctx context.Context) (*tls.ConnectionState, string, bool) {
	c := wire.ConnOf(ctx)
	if c == nil {
		return nil, "", false
	}
	t, ok := tlsConn(c)
	if !ok {
		return &tls.ConnectionState{}, c.RemoteAddr().String(), true
	}
	st := t.ConnectionState()
	return &st, c.RemoteAddr().String(), true
}

// errNotTLS is returned by terminated for a connection without TLS.
var errNotTLS = errors.New("tls: connection did not come through the TLS listener")
