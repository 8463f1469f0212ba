package iscsi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"sort"
)

// MinCHAPSecretLen is the shortest CHAP secret a secrets file may hold: 12
// bytes, the 96 bits RFC 7143 (section 12.1.3) asks for at least.
const MinCHAPSecretLen = 12

// ErrCHAPSecrets is wrapped by every error about a CHAP secrets file.
var ErrCHAPSecrets = errors.New("iscsi: CHAP secrets")

// CHAPSecrets are the CHAP secrets of a target portal, as an operator keeps
// them in a file (ReadCHAPSecrets):
//
//	{
//	  "default":   {"user": "node", "secret": "secret-of-16-chars"},
//	  "discovery": {"user": "disc", "secret": "another-secret-16"},
//	  "targets": {
//	    "db": {"user": "db-node", "secret": "db-secret-16-chars",
//	           "mutual_user": "cairn", "mutual_secret": "target-secret-16"}
//	  }
//	}
//
// Every member is optional. Targets lists volumes with secrets of their
// own; Default applies to every other volume (without it they accept
// AuthMethod None); Discovery, when present, is required of discovery
// sessions.
type CHAPSecrets struct {
	Default   *CHAP           `json:"default,omitempty"`
	Discovery *CHAP           `json:"discovery,omitempty"`
	Targets   map[string]CHAP `json:"targets,omitempty"`
}

// ReadCHAPSecrets reads and checks a CHAP secrets file.
func ReadCHAPSecrets(path string) (*CHAPSecrets, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCHAPSecrets, err)
	}
	s, err := ParseCHAPSecrets(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// ParseCHAPSecrets decodes and checks the JSON of a CHAP secrets file:
// unknown members, missing users or secrets, secrets shorter than
// MinCHAPSecretLen, a mutual secret equal to the initiator's, and half a
// mutual pair are refused.
func ParseCHAPSecrets(data []byte) (*CHAPSecrets, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var s CHAPSecrets
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCHAPSecrets, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: unexpected data after the JSON object", ErrCHAPSecrets)
	}
	if s.Default != nil {
		if err := checkSecrets(s.Default); err != nil {
			return nil, fmt.Errorf("%w: default: %w", ErrCHAPSecrets, err)
		}
	}
	if s.Discovery != nil {
		if err := checkSecrets(s.Discovery); err != nil {
			return nil, fmt.Errorf("%w: discovery: %w", ErrCHAPSecrets, err)
		}
	}
	names := make([]string, 0, len(s.Targets))
	for name := range s.Targets {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if name == "" {
			return nil, fmt.Errorf("%w: targets: empty volume name", ErrCHAPSecrets)
		}
		e := s.Targets[name]
		if err := checkSecrets(&e); err != nil {
			return nil, fmt.Errorf("%w: target %q: %w", ErrCHAPSecrets, name, err)
		}
	}
	return &s, nil
}

// checkSecrets refuses secrets a secrets file must not hold.
func checkSecrets(e *CHAP) error {
	if e.User == "" {
		return errors.New("user is empty")
	}
	if len(e.Secret) < MinCHAPSecretLen {
		return fmt.Errorf("secret of %d bytes, at least %d needed", len(e.Secret), MinCHAPSecretLen)
	}
	if (e.MutualUser == "") != (e.MutualSecret == "") {
		return errors.New("mutual_user and mutual_secret go together")
	}
	if e.MutualSecret != "" {
		if len(e.MutualSecret) < MinCHAPSecretLen {
			return fmt.Errorf("mutual secret of %d bytes, at least %d needed", len(e.MutualSecret), MinCHAPSecretLen)
		}
		if e.MutualSecret == e.Secret {
			return errors.New("mutual secret equals the initiator's secret (RFC 7143 forbids reusing it)")
		}
	}
	return nil
}

// Apply configures c to require the secrets: CHAP for the listed targets,
// CHAPFor for every other volume when a default exists, and DiscoveryCHAP.
func (s *CHAPSecrets) Apply(c *Config) {
	c.CHAP = maps.Clone(s.Targets)
	c.CHAPFor = nil
	if s.Default != nil {
		def := *s.Default
		c.CHAPFor = func(string) (CHAP, bool) { return def, true }
	}
	c.DiscoveryCHAP = nil
	if s.Discovery != nil {
		d := *s.Discovery
		c.DiscoveryCHAP = &d
	}
}
