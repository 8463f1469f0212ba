package iscsi

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseCHAPSecrets(t *testing.T) {
	good := `{
	  "default":   {"user": "node", "secret": "node-secret-16ch"},
	  "discovery": {"user": "disc", "secret": "discovery-secret"},
	  "targets": {
	    "db": {"user": "db-node", "secret": "db-secret-16char", "mutual_user": "cairn", "mutual_secret": "target-secret-16"}
	  }
	}`
	s, err := ParseCHAPSecrets([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	var c Config
	s.Apply(&c)
	if got := c.CHAP["db"]; got != (CHAP{User: "db-node", Secret: "db-secret-16char", MutualUser: "cairn", MutualSecret: "target-secret-16"}) {
		t.Errorf("db secrets: %+v", got)
	}
	if got, ok := c.chapFor("other"); !ok || got != (CHAP{User: "node", Secret: "node-secret-16ch"}) {
		t.Errorf("default secrets for another volume: %+v %v", got, ok)
	}
	if got, ok := c.chapFor("db"); !ok || got.User != "db-node" {
		t.Errorf("a target's own secrets must win over the default: %+v %v", got, ok)
	}
	if c.DiscoveryCHAP == nil || *c.DiscoveryCHAP != (CHAP{User: "disc", Secret: "discovery-secret"}) {
		t.Errorf("discovery secrets: %+v", c.DiscoveryCHAP)
	}

	// Without a default, other volumes accept AuthMethod None.
	s, err = ParseCHAPSecrets([]byte(`{"targets": {"db": {"user": "u", "secret": "twelve-bytes"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	c = Config{}
	s.Apply(&c)
	if _, ok := c.chapFor("other"); ok || c.DiscoveryCHAP != nil {
		t.Errorf("secrets for volumes the file does not name: %v, discovery %v", ok, c.DiscoveryCHAP)
	}

	for _, tc := range []struct{ name, json, want string }{
		{"not JSON", `default: x`, "invalid character"},
		{"unknown member", `{"defualt": {"user": "u", "secret": "twelve-bytes"}}`, `unknown field "defualt"`},
		{"unknown entry member", `{"default": {"user": "u", "password": "twelve-bytes"}}`, `unknown field "password"`},
		{"trailing data", `{} {}`, "after the JSON object"},
		{"no user", `{"default": {"secret": "twelve-bytes"}}`, "default: user is empty"},
		{"short secret", `{"discovery": {"user": "u", "secret": "short"}}`, "discovery: secret of 5 bytes, at least 12"},
		{"half a mutual pair", `{"targets": {"v": {"user": "u", "secret": "twelve-bytes", "mutual_user": "t"}}}`, `target "v": mutual_user and mutual_secret go together`},
		{"short mutual secret", `{"targets": {"v": {"user": "u", "secret": "twelve-bytes", "mutual_user": "t", "mutual_secret": "tiny"}}}`, "mutual secret of 4 bytes"},
		{"reused secret", `{"targets": {"v": {"user": "u", "secret": "twelve-bytes", "mutual_user": "t", "mutual_secret": "twelve-bytes"}}}`, "equals the initiator's secret"},
		{"empty volume name", `{"targets": {"": {"user": "u", "secret": "twelve-bytes"}}}`, "empty volume name"},
	} {
		_, err := ParseCHAPSecrets([]byte(tc.json))
		if err == nil || !errors.Is(err, ErrCHAPSecrets) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an ErrCHAPSecrets about %q", tc.name, err, tc.want)
		}
	}
}

func TestReadCHAPSecretsNamesTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "chap.json")
	if _, err := ReadCHAPSecrets(path); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if err := os.WriteFile(path, []byte(`{"default": {"user": "u", "secret": "short"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadCHAPSecrets(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("bad file: %v, want its path in the error", err)
	}
}
