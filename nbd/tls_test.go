package nbd

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/testtool"
)

// tlsFixture is a CA, the server's TLS configuration (client certificates
// required) and a directory of client credentials in the layout libnbd and
// qemu read (ca-cert.pem, client-cert.pem, client-key.pem).
type tlsFixture struct {
	server    *certs.Source
	clientDir string
	// anonDir trusts the CA but holds no client certificate.
	anonDir string
}

func newTLSFixture(t *testing.T) *tlsFixture {
	t.Helper()
	dir := t.TempDir()
	ca, err := certs.OpenCA(filepath.Join(dir, "ca"), "nbd test CA")
	if err != nil {
		t.Fatal(err)
	}
	srvFiles, err := ca.Issue(dir, "server", certs.Request{Name: "gateway", Roles: []certs.Role{certs.RoleClient}, Hosts: []string{"127.0.0.1", "localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := certs.Load(srvFiles, nil)
	if err != nil {
		t.Fatal(err)
	}
	f := &tlsFixture{server: srv, clientDir: filepath.Join(dir, "client"), anonDir: filepath.Join(dir, "anon")}
	cli, err := ca.Issue(dir, "client", certs.Request{Name: "nbd-client", Roles: []certs.Role{certs.RoleClient}})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{f.clientDir, f.anonDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		copyFile(t, ca.CertFile, filepath.Join(d, "ca-cert.pem"))
	}
	copyFile(t, cli.Cert, filepath.Join(f.clientDir, "client-cert.pem"))
	copyFile(t, cli.Key, filepath.Join(f.clientDir, "client-key.pem"))
	return f
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// tlsURI is an nbds:// URI with the client credentials in dir.
func (e *testEnv) tlsURI(name, dir string) string {
	return fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", e.addr, name, dir)
}

// TestStartTLSRequired: with RequireTLS, a plaintext client is told TLS
// is required and gets nothing; libnbd (nbdcopy) over nbds:// with a
// client certificate copies in and out byte for byte; qemu-img with x509
// credentials reads the same bytes; a client without a certificate is
// refused in the handshake.
func TestStartTLSRequired(t *testing.T) {
	testtool.Need(t, "nbdinfo", "nbdcopy", "qemu-img")
	fx := newTLSFixture(t)
	env := newTestEnv(t, func(c *Config) { c.TLS, c.RequireTLS = fx.server.ServerConfig(), true })
	const size = 8 << 20
	vol := env.createExport("vol", size, nil)

	out := run(t, true, "nbdinfo", env.uri("vol"))
	if !strings.Contains(strings.ToLower(out), "tls") {
		t.Errorf("plaintext client on a TLS-only server: %s", out)
	}
	src := filepath.Join(t.TempDir(), "src.raw")
	want := testtool.RandomFile(t, src, size)
	run(t, false, "nbdcopy", "--flush", src, env.tlsURI("vol", fx.clientDir))
	if !bytes.Equal(readFile(t, vol), want) {
		t.Fatal("export differs from the source after nbdcopy over TLS")
	}
	back := filepath.Join(t.TempDir(), "back.raw")
	run(t, false, "nbdcopy", env.tlsURI("vol", fx.clientDir), back)
	if !bytes.Equal(readFile(t, back), want) {
		t.Fatal("copy out over TLS differs")
	}
	qemuOut := filepath.Join(t.TempDir(), "qemu.raw")
	host, port, _ := strings.Cut(env.addr, ":")
	run(t, false, "qemu-img", "convert",
		"--object", "tls-creds-x509,id=tls0,dir="+fx.clientDir+",endpoint=client",
		"--image-opts", fmt.Sprintf("driver=nbd,server.type=inet,server.host=%s,server.port=%s,export=vol,tls-creds=tls0", host, port),
		"-O", "raw", qemuOut)
	if !bytes.Equal(readFile(t, qemuOut), want) {
		t.Fatal("qemu-img over TLS read other bytes")
	}
	if out := run(t, true, "nbdinfo", env.tlsURI("vol", fx.anonDir)); !strings.Contains(strings.ToLower(out), "tls") &&
		!strings.Contains(strings.ToLower(out), "certificate") && !strings.Contains(out, "handshake") {
		t.Errorf("client without a certificate: %s", out)
	}
}

// TestStartTLSOptional: without RequireTLS, plaintext and TLS clients are
// both served; a server without TLS answers NBD_OPT_STARTTLS as
// unsupported, so an nbds:// client fails.
func TestStartTLSOptional(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	fx := newTLSFixture(t)
	env := newTestEnv(t, func(c *Config) { c.TLS = fx.server.ServerConfig() })
	env.createExport("vol", 1<<20, nil)
	for _, uri := range []string{env.uri("vol"), env.tlsURI("vol", fx.clientDir)} {
		if out := run(t, false, "nbdinfo", "--size", uri); strings.TrimSpace(out) != "1048576" {
			t.Fatalf("nbdinfo --size %s: %q", uri, out)
		}
	}
	plain := newTestEnv(t)
	plain.createExport("vol", 1<<20, nil)
	run(t, true, "nbdinfo", plain.tlsURI("vol", fx.clientDir))
}

// TestStartTLSNegotiation: on a server that requires TLS, options before
// NBD_OPT_STARTTLS get NBD_REP_ERR_TLS_REQD and NBD_OPT_EXPORT_NAME a
// hang-up; after the upgrade the negotiation goes on over TLS, where a
// second NBD_OPT_STARTTLS is invalid.
func TestStartTLSNegotiation(t *testing.T) {
	fx := newTLSFixture(t)
	env := newTestEnv(t, func(c *Config) { c.TLS, c.RequireTLS = fx.server.ServerConfig(), true })
	env.createExport("vol", 1<<20, nil)

	c := dial(t, env.addr, clientFlagFixedNewstyle|clientFlagNoZeroes)
	for _, opt := range []uint32{optList, optStructuredReply} {
		c.sendOption(opt, nil)
		if r := c.optionReply(); r.typ != repErrTLSReqd {
			t.Fatalf("%s before TLS: reply %#x, want NBD_REP_ERR_TLS_REQD", optionName(opt), r.typ)
		}
	}
	c.sendOption(optStartTLS, nil)
	if r := c.optionReply(); r.typ != repAck {
		t.Fatalf("NBD_OPT_STARTTLS: reply %#x", r.typ)
	}
	ca := x509.NewCertPool()
	pemCA, err := os.ReadFile(filepath.Join(fx.clientDir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	ca.AppendCertsFromPEM(pemCA)
	cert, err := tls.LoadX509KeyPair(filepath.Join(fx.clientDir, "client-cert.pem"), filepath.Join(fx.clientDir, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(c.nc, &tls.Config{RootCAs: ca, ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert}})
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake after NBD_OPT_STARTTLS: %v", err)
	}
	c.nc, c.r = tc, bufio.NewReader(tc)
	c.sendOption(optStartTLS, nil)
	if r := c.optionReply(); r.typ != repErrInvalid {
		t.Fatalf("a second NBD_OPT_STARTTLS: reply %#x, want NBD_REP_ERR_INVALID", r.typ)
	}
	c.sendOption(optList, nil)
	if r := c.optionReply(); r.typ != repServer {
		t.Fatalf("NBD_OPT_LIST over TLS: reply %#x", r.typ)
	}

	c2 := dial(t, env.addr, clientFlagFixedNewstyle|clientFlagNoZeroes)
	c2.sendOption(optExportName, []byte("vol"))
	c2.expectClosed()
}
