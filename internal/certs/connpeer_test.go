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

	"cairn.io/cairn/internal/soon"
)

// TestWireConnectionIdentityIsLearnedOnce: WireConnContext learns a
// connection's caller at once; PeerOf and Policy.Check answer from it, still
// refusing a caller whose certificate has expired since, and VerifyHost keeps
// each host's answer with the connection.
func TestWireConnectionIdentityIsLearnedOnce(t *testing.T) {
	ca, dir := newCA(t)
	l := tlsListener(t, ca, dir, "cs1", RoleChunkServer)
	// A certificate that runs out a few seconds into the connection.
	f, err := ca.Issue(dir, "cs2", Request{Name: "cs2", Roles: []Role{RoleChunkServer}, Hosts: []string{"127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), Valid: time.Hour + 3*time.Second})
	if err != nil {
		t.Fatal(err)
	}
	cliID, err := Load(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	clientCtx, stopClient := context.WithTimeout(context.Background(), 20*time.Second)
	defer stopClient()
	go func() {
		ctx := clientCtx
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
	// Another certificate gets its own answer, not the connection's kept one.
	of, err := ca.Issue(dir, "cs3", Request{Name: "cs3", Roles: []Role{RoleChunkServer}, Hosts: []string{"10.1.2.3"}})
	if err != nil {
		t.Fatal(err)
	}
	cs3, err := Load(of, nil)
	if err != nil {
		t.Fatal(err)
	}
	otherCert, _ := cs3.current()
	if err := VerifyHost(ctx, Peer{Cert: otherCert.Leaf}, "10.1.2.3"); err != nil {
		t.Errorf("another certificate for its own host: %v", err)
	}
	if n := len(identityOf(ctx).hosts); n != 2 {
		t.Errorf("another certificate's check changed the connection's kept answers (%d)", n)
	}

	// The certificate runs out while the connection lives on: the caller
	// has no identity left.
	soon.True(t, 10*time.Second, "the certificate expired", func() bool {
		_, err := PeerOf(ctx)
		return errors.Is(err, ErrNoIdentity) && strings.Contains(err.Error(), "expired at")
	})
	if err := pol.Check(ctx, "raft"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("a Raft batch after the certificate's end: %v, want Unauthenticated", err)
	}

	// A connection without TLS has no identity.
	raw, other := net.Pipe()
	defer raw.Close()
	defer other.Close()
	if _, err := PeerOf(WireConnContext(context.Background(), raw)); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("plaintext connection: %v", err)
	}
}
