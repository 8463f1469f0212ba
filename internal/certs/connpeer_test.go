package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestWireConnectionIdentityIsLearnedOnce: WireConnContext learns a
// connection's caller at once; PeerOf and Policy.Check answer from it, still
// refusing a caller whose certificate has expired since, and VerifyHost keeps
// each host's answer with the connection.
func TestWireConnectionIdentityIsLearnedOnce(t *testing.T) {
	ca, dir := newCA(t)
	srvID, err := Load(issue(t, ca, dir, "cs1", RoleChunkServer), nil)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(inner, srvID, nil)
	defer l.Close()
	f, err := ca.Issue(dir, "cs2", Request{Name: "cs2", Roles: []Role{RoleChunkServer}, Hosts: []string{"127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), Valid: 2 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	cliID, err := Load(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if c, err := Dialer(cliID, RoleChunkServer)(ctx, l.Addr().String()); err == nil {
			_ = c.(*tls.Conn).HandshakeContext(ctx)
			defer c.Close()
			<-ctx.Done()
		}
	}()
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	ctx := WireConnContext(context.Background(), conn)
	p, err := PeerOf(ctx)
	if err != nil || p.Name != "cs2" || len(p.Roles) != 1 || p.Roles[0] != RoleChunkServer || p.Addr != conn.RemoteAddr().String() {
		t.Fatalf("PeerOf = %v, %v; want cs2 with the chunkserver role", p, err)
	}
	pol := &Policy{Methods: map[string][]Role{"raft": {RoleChunkServer}, "ops": {RoleOperator}}}
	if err := pol.Check(ctx, "raft"); err != nil {
		t.Errorf("a chunkserver sends Raft: %v", err)
	}
	if err := pol.Check(ctx, "ops"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a chunkserver runs an operator's call: %v", err)
	}

	// Host checks: answered as VerifyHostname does, and kept.
	if err := VerifyHost(ctx, p, "127.0.0.1"); err != nil {
		t.Errorf("the certificate's own host: %v", err)
	}
	if err := VerifyHost(ctx, p, "10.1.2.3"); err == nil {
		t.Error("a host the certificate does not name was taken")
	}
	if err := VerifyHost(ctx, p, "10.1.2.3"); err == nil {
		t.Error("a host the certificate does not name was taken the second time")
	}
	if n := len(identityOf(ctx).hosts); n != 2 {
		t.Errorf("%d host answers kept, want 2", n)
	}
	if err := VerifyHost(ctx, Peer{Addr: "x"}, "127.0.0.1"); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("a peer without a certificate: %v", err)
	}

	// The certificate runs out while the connection lives on.
	if _, err := identityOf(ctx).current(time.Now().Add(2 * time.Hour)); !errors.Is(err, ErrNoIdentity) || !strings.Contains(err.Error(), "expired at") {
		t.Errorf("after the certificate's end: %v, want no identity (expired)", err)
	}

	// A connection without TLS has no identity.
	raw, other := net.Pipe()
	defer raw.Close()
	defer other.Close()
	if _, err := PeerOf(WireConnContext(context.Background(), raw)); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("plaintext connection: %v", err)
	}
}
