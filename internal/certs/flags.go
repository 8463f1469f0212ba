package certs

import (
	"errors"
	"flag"
	"log/slog"
)

// Flags are the TLS flags every Cairn command shares.
type Flags struct {
	files    Files
	insecure bool
}

// AddFlags registers --tls-cert, --tls-key, --tls-ca and --insecure on fs.
func AddFlags(fs *flag.FlagSet) *Flags {
	f := &Flags{}
	fs.StringVar(&f.files.Cert, "tls-cert", "", "this process's certificate (PEM; its organizational units name its roles)")
	fs.StringVar(&f.files.Key, "tls-key", "", "the certificate's private key (PEM)")
	fs.StringVar(&f.files.CA, "tls-ca", "", "the certificate authorities trusted for peers (PEM)")
	fs.BoolVar(&f.insecure, "insecure", false, "run without TLS: no encryption, no authentication, every caller may do everything")
	return f
}

// ErrTLSRequired is returned when neither certificates nor --insecure are
// given.
var ErrTLSRequired = errors.New("TLS is required: give --tls-cert, --tls-key and --tls-ca (docs/security.md), or --insecure to run without it")

// Load returns the identity the flags name, or nil with --insecure.
func (f *Flags) Load(logger *slog.Logger) (*Source, error) {
	return Choose(f.files, f.insecure, logger)
}

// Choose loads files, or returns nil when insecure is set; it refuses both
// and neither.
func Choose(files Files, insecure bool, logger *slog.Logger) (*Source, error) {
	given := files != (Files{})
	switch {
	case insecure && given:
		return nil, errors.New("--insecure and --tls-* flags exclude each other")
	case insecure:
		return nil, nil
	case !given:
		return nil, ErrTLSRequired
	}
	return Load(files, logger)
}
