package playground

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/internal/certs"
)

// TLSState names the playground's certificate files: the CA every
// process trusts and the operator identity for cairn-ops.
type TLSState struct {
	CA           string `json:"ca"`
	OperatorCert string `json:"operator_cert"`
	OperatorKey  string `json:"operator_key"`
	// NBDClientDir holds an NBD client's credentials in the layout libnbd
	// (nbds://...?tls-certificates=DIR) and qemu (tls-creds-x509 dir=DIR)
	// read: ca-cert.pem, client-cert.pem, client-key.pem.
	NBDClientDir string `json:"nbd_client_dir"`
}

// NBDSURL is the nbds:// form of an nbd:// URL, with the playground's NBD
// client credentials.
func (t *TLSState) NBDSURL(nbdURL string) string {
	return "nbds://" + strings.TrimPrefix(nbdURL, "nbd://") + "?tls-certificates=" + t.NBDClientDir
}

// Files is the operator identity (what cairn-ops --tls-* take).
func (t *TLSState) Files() certs.Files {
	return certs.Files{Cert: t.OperatorCert, Key: t.OperatorKey, CA: t.CA}
}

// Flags are cairn-ops's flags for the operator identity.
func (t *TLSState) Flags() []string {
	if t == nil {
		return []string{"--insecure"}
	}
	return []string{"--tls-cert", t.OperatorCert, "--tls-key", t.OperatorKey, "--tls-ca", t.CA}
}

// tlsDir holds the playground's CA and certificates.
const tlsDir = "tls"

// issueCerts keeps a CA in the playground's directory (made on the first
// start, kept after) and issues every process its certificate, valid for
// loopback, on each start.
func (pg *Playground) issueCerts() (map[string]certs.Files, *TLSState, error) {
	dir := filepath.Join(pg.dir, tlsDir)
	ca, err := certs.OpenCA(dir, "Cairn playground CA")
	if err != nil {
		return nil, nil, fmt.Errorf("playground CA: %w", err)
	}
	hosts := []string{"127.0.0.1", "localhost"}
	out := map[string]certs.Files{}
	for _, p := range []struct {
		name  string
		roles []certs.Role
	}{
		{"mds", []certs.Role{certs.RoleMDS}},
		{"chunkserver", []certs.Role{certs.RoleChunkServer}},
		{"gateway", []certs.Role{certs.RoleClient}},
		{"operator", []certs.Role{certs.RoleOperator, certs.RoleClient}},
	} {
		f, err := ca.Issue(dir, p.name, certs.Request{Name: "playground-" + p.name, Roles: p.roles, Hosts: hosts})
		if err != nil {
			return nil, nil, fmt.Errorf("playground %s certificate: %w", p.name, err)
		}
		out[p.name] = f
	}
	op := out["operator"]
	st := &TLSState{CA: op.CA, OperatorCert: op.Cert, OperatorKey: op.Key, NBDClientDir: filepath.Join(dir, "nbd-client")}
	nbdc, err := ca.Issue(dir, "nbd-client", certs.Request{Name: "playground-nbd-client", Roles: []certs.Role{certs.RoleClient}})
	if err != nil {
		return nil, nil, fmt.Errorf("playground NBD client certificate: %w", err)
	}
	if err := os.MkdirAll(st.NBDClientDir, 0o700); err != nil {
		return nil, nil, err
	}
	for from, to := range map[string]string{ca.CertFile: "ca-cert.pem", nbdc.Cert: "client-cert.pem", nbdc.Key: "client-key.pem"} {
		b, err := os.ReadFile(from)
		if err == nil {
			err = fsutil.WriteFileAtomic(filepath.Join(st.NBDClientDir, to), b, 0o600)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("NBD client credentials: %w", err)
		}
	}
	return out, st, nil
}

// tlsArgs are the TLS flags of a daemon with identity f (or --insecure).
func tlsArgs(f *certs.Files) []string {
	if f == nil {
		return []string{"--insecure"}
	}
	return []string{"--tls-cert", f.Cert, "--tls-key", f.Key, "--tls-ca", f.CA}
}
