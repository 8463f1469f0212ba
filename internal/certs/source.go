package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"
)

// Files names the PEM files of a process's identity: its certificate
// (with any intermediates after it), its private key, and the certificate
// authorities it trusts for its peers.
type Files struct {
	Cert, Key, CA string
}

// reloadCheck is how often, at most, the files are checked for changes.
const reloadCheck = time.Second

// Source holds a process's certificate and the authorities it trusts, read
// from Files and read again when one of the files changes (checked at most
// once a second, at a handshake), so certificates rotate without a restart.
// A change that does not load (a half-written file, a key that does not
// match) is logged and the previous identity kept.
type Source struct {
	files Files
	log   *slog.Logger

	mu      sync.Mutex
	checked time.Time
	stamp   [3]time.Time // modification times of Cert, Key, CA loaded
	// failed is the last reload error logged, and when: a change that does
	// not load is tried again every second, logged once a minute.
	failed   string
	failedAt time.Time
	cert     *tls.Certificate
	leaf     *x509.Certificate
	pool     *x509.CertPool
}

// Load reads files. Every file must be given and load.
func Load(files Files, logger *slog.Logger) (*Source, error) {
	if files.Cert == "" || files.Key == "" || files.CA == "" {
		return nil, errors.New("tls: a certificate, its key and a CA file are all needed")
	}
	if logger == nil {
		logger = slog.Default()
	}
	s := &Source{files: files, log: logger}
	stamp, err := s.stamps()
	if err != nil {
		return nil, err
	}
	if err := s.load(stamp); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Source) stamps() ([3]time.Time, error) {
	var out [3]time.Time
	for i, p := range []string{s.files.Cert, s.files.Key, s.files.CA} {
		st, err := os.Stat(p)
		if err != nil {
			return out, fmt.Errorf("tls: %w", err)
		}
		out[i] = st.ModTime()
	}
	return out, nil
}

// load reads the files and installs what they hold.
func (s *Source) load(stamp [3]time.Time) error {
	cert, err := tls.LoadX509KeyPair(s.files.Cert, s.files.Key)
	if err != nil {
		return fmt.Errorf("tls: load %s and %s: %w", s.files.Cert, s.files.Key, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return fmt.Errorf("tls: parse %s: %w", s.files.Cert, err)
	}
	cert.Leaf = leaf
	caPEM, err := os.ReadFile(s.files.CA)
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("tls: %s holds no PEM certificate", s.files.CA)
	}
	if len(RolesOf(leaf)) == 0 {
		return fmt.Errorf("tls: %s names no Cairn role (an organizational unit such as %q)", s.files.Cert, RoleChunkServer)
	}
	// Only an identity peers will take: valid now, from an authority of
	// the CA file (the one the cluster trusts).
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("tls: %s (%s) does not verify against %s: %w", s.files.Cert, leaf.Subject, s.files.CA, err)
	}
	s.cert, s.leaf, s.pool, s.stamp = &cert, leaf, pool, stamp
	return nil
}

// current returns the identity, reloading it first when a file changed.
func (s *Source) current() (*tls.Certificate, *x509.CertPool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if now := time.Now(); now.Sub(s.checked) >= reloadCheck {
		s.checked = now
		stamp, err := s.stamps()
		if err == nil && stamp != s.stamp {
			if err := s.load(stamp); err != nil {
				if err.Error() != s.failed || now.Sub(s.failedAt) >= time.Minute {
					s.log.Warn("certificate files changed but do not load; keeping the previous ones", "err", err)
					s.failed, s.failedAt = err.Error(), now
				}
			} else {
				s.failed = ""
				s.log.Info("certificates reloaded", "subject", s.leaf.Subject.String(), "not_after", s.leaf.NotAfter)
			}
		}
	}
	return s.cert, s.pool
}

// Files are the files s reads (to hand to a child process).
func (s *Source) Files() Files { return s.files }

// Roles are the roles of this process's own certificate.
func (s *Source) Roles() []Role {
	s.current()
	s.mu.Lock()
	defer s.mu.Unlock()
	return RolesOf(s.leaf)
}

// ServerConfig is the TLS configuration of a listener: the current
// certificate, and peers must present one signed by a trusted authority.
func (s *Source) ServerConfig() *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS13}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		cert, pool := s.current()
		return &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{*cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    pool,
			NextProtos:   []string{"h2"},
		}, nil
	}
	return base
}

// ServerConfigFor is ServerConfig for a listener that serves only
// callers with one of roles (a gateway's NBD port: clients and operators).
func (s *Source) ServerConfigFor(roles ...Role) *tls.Config {
	base := s.ServerConfig()
	get := base.GetConfigForClient
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		cfg, err := get(hello)
		if err != nil {
			return nil, err
		}
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) > 0 {
				for _, r := range RolesOf(cs.PeerCertificates[0]) {
					if slices.Contains(roles, r) {
						return nil
					}
				}
			}
			return fmt.Errorf("tls: a certificate with one of the roles %v is needed here", roles)
		}
		return cfg, nil
	}
	return base
}

// ClientConfig is the TLS configuration of a connection this process
// opens: it presents the current certificate and accepts a server whose
// certificate a currently trusted authority signed for the host dialled
// (set ServerName, or let tls.Dial set it from the address).
func (s *Source) ClientConfig() *tls.Config {
	_, pool := s.current()
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _ := s.current()
			return cert, nil
		},
	}
}

// checkOwn fails when this process's own certificate is not valid now: a
// server would refuse it, and in TLS 1.3 the caller would learn only
// that the connection broke.
func (s *Source) checkOwn() error {
	cert, _ := s.current()
	leaf := cert.Leaf
	now := time.Now()
	switch {
	case now.After(leaf.NotAfter):
		return fmt.Errorf("tls: this process's certificate %s (%s) expired at %s", s.files.Cert, leaf.Subject, leaf.NotAfter.UTC().Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Errorf("tls: this process's certificate %s (%s) is not valid before %s", s.files.Cert, leaf.Subject, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}
