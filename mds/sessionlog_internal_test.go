package mds

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"testing"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"cairn.io/cairn/internal/certs"
)

// TestOperatorName: a session's close is an operator's when the caller's
// verified certificate has the operator role and not the client role.
func TestOperatorName(t *testing.T) {
	dir := t.TempDir()
	ca, err := certs.OpenCA(dir, "test CA")
	if err != nil {
		t.Fatal(err)
	}
	callerCtx := func(name string, roles ...certs.Role) context.Context {
		f, err := ca.Issue(dir, name, certs.Request{Name: name, Roles: roles, Hosts: []string{"127.0.0.1"}})
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(f.Cert)
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			t.Fatalf("%s: no PEM block", f.Cert)
		}
		leaf, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return peer.NewContext(context.Background(), &peer.Peer{
			Addr:     &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4242},
			AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}}},
		})
	}
	for _, tc := range []struct {
		name string
		ctx  context.Context
		want string
		ok   bool
	}{
		{"operator", callerCtx("alice", certs.RoleOperator), "alice", true},
		{"client", callerCtx("gw1", certs.RoleClient), "", false},
		{"operator and client", callerCtx("both", certs.RoleOperator, certs.RoleClient), "", false},
		{"plaintext", peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4243}}), "", false},
		{"no peer", context.Background(), "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, ok := operatorName(tc.ctx); got != tc.want || ok != tc.ok {
				t.Fatalf("operatorName: %q %v, want %q %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}
