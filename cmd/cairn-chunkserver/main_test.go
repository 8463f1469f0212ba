package main

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigFileFillsUnsetFlags(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	zone := fs.String("zone", "", "")
	mds := fs.String("mds", "", "")
	dir := fs.String("data-dir", "", "")
	fs.String("config", "", "")
	if err := fs.Parse([]string{"--zone", "from-flag"}); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "cs.yaml")
	if err := os.WriteFile(p, []byte("zone: from-file\ndata-dir: /data/cs0\nmds: [127.0.0.1:6700, 127.0.0.1:6710]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(fs, p); err != nil {
		t.Fatal(err)
	}
	if *zone != "from-flag" || *dir != "/data/cs0" || *mds != "127.0.0.1:6700,127.0.0.1:6710" {
		t.Fatalf("zone=%q data-dir=%q mds=%q", *zone, *dir, *mds)
	}
	if err := os.WriteFile(p, []byte("bogus: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := applyConfigFile(fs, p); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Fatalf("unknown setting not refused: %v", err)
	}
}

func TestMissingRequiredFlags(t *testing.T) {
	if err := run([]string{"--zone", "z"}); err == nil || !strings.Contains(err.Error(), "--data-dir") {
		t.Fatalf("missing data dir: %v", err)
	}
	if err := run([]string{"--data-dir", t.TempDir()}); err == nil || !strings.Contains(err.Error(), "--zone") {
		t.Fatalf("missing zone: %v", err)
	}
}
