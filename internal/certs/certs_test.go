package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

func newCA(t *testing.T) (*CA, string) {
	t.Helper()
	dir := t.TempDir()
	ca, err := OpenCA(dir, "test")
	if err != nil {
		t.Fatal(err)
	}
	return ca, dir
}

func issue(t *testing.T, ca *CA, dir, name string, roles ...Role) Files {
	t.Helper()
	f, err := ca.Issue(dir, name, Request{Name: name, Roles: roles, Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestRolesComeFromOrganizationalUnits(t *testing.T) {
	ca, dir := newCA(t)
	s, err := Load(issue(t, ca, dir, "op", RoleOperator, RoleClient), nil)
	if err != nil {
		t.Fatal(err)
	}
	got := s.Roles()
	slices.Sort(got)
	if !slices.Equal(got, []Role{RoleClient, RoleOperator}) {
		t.Fatalf("roles %v", got)
	}
	// The CA reopens from its files; a certificate without a role is
	// refused at issue.
	again, err := OpenCA(dir, "ignored")
	if err != nil || again.cert.Subject.CommonName != "test" {
		t.Fatalf("reopen CA: %v", err)
	}
	if _, err := ca.Issue(dir, "none", Request{}); err == nil {
		t.Fatal("issued a certificate without a role")
	}
}

func TestChooseNeedsTLSOrInsecure(t *testing.T) {
	ca, dir := newCA(t)
	f := issue(t, ca, dir, "cs", RoleChunkServer)
	for _, tc := range []struct {
		files    Files
		insecure bool
		want     string // "" loads, "nil" is insecure
	}{
		{Files{}, false, "TLS is required"},
		{Files{}, true, "nil"},
		{f, true, "exclude each other"},
		{Files{Cert: f.Cert}, false, "all needed"},
		{Files{Cert: f.Cert, Key: f.Key, CA: filepath.Join(dir, "missing")}, false, "no such file"},
		{Files{Cert: f.Cert, Key: f.Key, CA: f.Key}, false, "no PEM certificate"},
		{Files{Cert: f.Cert, Key: f.Key, CA: otherCA(t)}, false, "does not verify"},
		{f, false, ""},
	} {
		s, err := Choose(tc.files, tc.insecure, nil)
		switch {
		case tc.want == "" && (err != nil || s == nil):
			t.Errorf("%+v: %v", tc, err)
		case tc.want == "nil" && (err != nil || s != nil):
			t.Errorf("%+v: %v, %v; want no identity", tc, s, err)
		case tc.want != "" && tc.want != "nil" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%+v: %v, want %q", tc, err, tc.want)
		}
	}
}

// TestReloadKeepsTheLastGoodIdentity: a re-issued certificate is picked up
// within the check interval; a broken one is logged and the previous kept.
func TestReloadKeepsTheLastGoodIdentity(t *testing.T) {
	ca, dir := newCA(t)
	f := issue(t, ca, dir, "gw", RoleClient)
	s, err := Load(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	first, _ := s.current()
	issue(t, ca, dir, "gw", RoleClient, RoleOperator)
	s.mu.Lock()
	s.checked = time.Time{} // the next use checks the files
	s.mu.Unlock()
	second, _ := s.current()
	if string(second.Certificate[0]) == string(first.Certificate[0]) || !slices.Contains(s.Roles(), RoleOperator) {
		t.Fatal("a re-issued certificate was not loaded")
	}
	if err := os.WriteFile(f.Cert, []byte("not PEM"), 0o644); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.checked = time.Time{}
	s.mu.Unlock()
	third, _ := s.current()
	if third != second {
		t.Fatal("a broken certificate file replaced a good identity")
	}
}

// TestHandshakeAndPolicy: over a real listener, a client of the right CA
// gets through and its roles reach the policy; a client of another CA is
// refused in the handshake; a server is verified against the host dialled.
// tlsListener listens on a loopback port with a server certificate of
// name and role from ca, until the test ends.
func tlsListener(t *testing.T, ca *CA, dir, name string, role Role) net.Listener {
	t.Helper()
	id, err := Load(issue(t, ca, dir, name, role), nil)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(inner, id, nil)
	t.Cleanup(func() { l.Close() })
	return l
}

func TestHandshakeAndPolicy(t *testing.T) {
	ca, dir := newCA(t)
	l := tlsListener(t, ca, dir, "mds", RoleMDS)
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func(id *Source, addr string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := Dialer(id, RoleMDS)(ctx, addr)
		if err == nil {
			err = c.(*tls.Conn).HandshakeContext(ctx)
			c.Close()
		}
		return err
	}

	client, err := Load(issue(t, ca, dir, "gw", RoleClient), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := dial(client, l.Addr().String()); err != nil {
		t.Fatalf("a client of the same CA: %v", err)
	}
	conn := <-accepted
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: conn.RemoteAddr(),
		AuthInfo: credentials.TLSInfo{State: conn.(*tls.Conn).ConnectionState()}})
	p := &Policy{Methods: map[string][]Role{"/x/Delete": {RoleOperator}}, Default: Roles}
	if err := p.Check(ctx, "/x/List"); err != nil {
		t.Errorf("client lists: %v", err)
	}
	if err := p.Check(ctx, "/x/Delete"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "gw") {
		t.Errorf("client deletes: %v", err)
	}
	if err := p.Check(context.Background(), "/x/List"); status.Code(err) != codes.Unauthenticated {
		t.Errorf("no identity: %v", err)
	}
	// A server is taken only with the role the caller expects of it.
	ctx5, cancel5 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel5()
	if _, err := Dialer(client, RoleChunkServer)(ctx5, l.Addr().String()); err == nil || !strings.Contains(err.Error(), "chunkserver role") {
		t.Errorf("the MDS's certificate taken for a chunkserver's: %v", err)
	}

	otherCA, otherDir := newCA(t)
	stranger, err := Load(issue(t, otherCA, otherDir, "gw", RoleClient), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := dial(stranger, l.Addr().String()); err == nil {
		t.Fatal("a client of another CA completed the handshake")
	}
	// The server's certificate names 127.0.0.1 only: dialled by the name
	// localhost (the same listener) it fails verification of the host.
	if err := dial(client, strings.Replace(l.Addr().String(), "127.0.0.1", "localhost", 1)); err == nil || !strings.Contains(err.Error(), "localhost") {
		t.Fatalf("a server certificate without the dialled host name: %v", err)
	}
}

// otherCA returns the certificate file of a CA that signed nothing here.
func otherCA(t *testing.T) string {
	t.Helper()
	ca, _ := newCA(t)
	return ca.CertFile
}

func TestExpiredCertificatesDoNotLoad(t *testing.T) {
	ca, dir := newCA(t)
	f, err := ca.Issue(dir, "old", Request{Roles: []Role{RoleClient}, NotBefore: time.Now().Add(-48 * time.Hour), Valid: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Load(f, nil); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("an expired certificate: %v", err)
	}
}

// flakyListener fails its first Accept, as a process out of file
// descriptors does.
type flakyListener struct {
	net.Listener
	failed atomic.Bool
}

func (f *flakyListener) Accept() (net.Conn, error) {
	if !f.failed.Swap(true) {
		return nil, errors.New("accept4: too many open files")
	}
	return f.Listener.Accept()
}

// TestListenerSurvivesAcceptErrors: an accept error other than the
// listener's closing is waited out, not fatal.
func TestListenerSurvivesAcceptErrors(t *testing.T) {
	ca, dir := newCA(t)
	srv, err := Load(issue(t, ca, dir, "mds", RoleMDS), nil)
	if err != nil {
		t.Fatal(err)
	}
	client, err := Load(issue(t, ca, dir, "gw", RoleClient), nil)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(&flakyListener{Listener: inner}, srv, slog.New(slog.DiscardHandler))
	defer l.Close()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if c, err := Dialer(client, RoleMDS)(ctx, inner.Addr().String()); err == nil {
			defer c.Close()
			_, _ = c.Read(make([]byte, 1))
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("accept after a failed one: %v", err)
	}
	c.Close()
	l.Close()
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("accept after Close: %v", err)
	}
}
