package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nbd-listen", "-", "--iscsi-listen", "-"}, "nothing to serve"},
		{[]string{"--mds", " , "}, "no MDS address"},
		{[]string{"--log-level", "loud"}, "--log-level"},
		{[]string{"--poll-interval", "-1s"}, "poll interval"},
		{[]string{"stray"}, "unexpected arguments"},
		{[]string{"--tls-cert", "a.crt"}, "are all needed"},
		{nil, "TLS is required"},
	} {
		args := tc.args
		if !strings.Contains(tc.want, "TLS") && !strings.Contains(tc.want, "all needed") {
			args = append([]string{"--insecure"}, args...)
		}
		err := run(args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error about %q", tc.args, err, tc.want)
		}
	}
}

func TestCHAPSecretsFlag(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "chap.json")
	if err := os.WriteFile(good, []byte(`{"default": {"user": "node", "secret": "node-secret-16ch"},
		"targets": {"db": {"user": "db", "secret": "db-secret-16char"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig([]string{"--iscsi-chap", good, "--insecure"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ISCSI.CHAP["db"].Secret != "db-secret-16char" || cfg.ISCSI.CHAPFor == nil {
		t.Errorf("CHAP secrets not applied: %+v", cfg.ISCSI.CHAP)
	}
	if c, ok := cfg.ISCSI.CHAPFor("vol0"); !ok || c.User != "node" {
		t.Errorf("default secrets: %+v %v", c, ok)
	}
	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"default": {"user": "node", "secret": "short"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, want string }{
		{bad, "--iscsi-chap: " + bad + ": iscsi: CHAP secrets: default: secret of 5 bytes"},
		{filepath.Join(dir, "missing.json"), "no such file"},
	} {
		if _, err := parseConfig([]string{"--iscsi-chap", tc.file, "--insecure"}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.file, err, tc.want)
		}
	}
}

func TestMemoryBudgetFlags(t *testing.T) {
	cfg, err := parseConfig([]string{"--insecure"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NBD.MaxInFlightBytes != 64<<20 || cfg.ISCSI.MaxSessionBuffer != 64<<20 || cfg.VolumeMaxInflightBytes != 64<<20 {
		t.Fatalf("defaults: nbd %d, iscsi %d, volume %d", cfg.NBD.MaxInFlightBytes, cfg.ISCSI.MaxSessionBuffer, cfg.VolumeMaxInflightBytes)
	}
	cfg, err = parseConfig([]string{"--nbd-max-inflight-bytes", "128MiB", "--iscsi-session-buffer", "32MiB", "--volume-max-inflight-bytes", "16MiB", "--insecure"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NBD.MaxInFlightBytes != 128<<20 || cfg.ISCSI.MaxSessionBuffer != 32<<20 || cfg.VolumeMaxInflightBytes != 16<<20 {
		t.Fatalf("set: nbd %d, iscsi %d, volume %d", cfg.NBD.MaxInFlightBytes, cfg.ISCSI.MaxSessionBuffer, cfg.VolumeMaxInflightBytes)
	}
	if _, err := parseConfig([]string{"--iscsi-session-buffer", "lots", "--insecure"}); err == nil {
		t.Fatal("a malformed size was accepted")
	}
}
