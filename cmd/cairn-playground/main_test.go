package main

import (
	"bytes"
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
		{[]string{"--base-port", "80"}, "--base-port"},
		{[]string{"--copysets-per-chunkserver", "0"}, "--copysets-per-chunkserver"},
		{[]string{"--pool-size", "lots"}, "pool-size"},
		{[]string{"extra"}, "unexpected arguments"},
		{[]string{"--log-level", "loud"}, "--log-level"},
		{[]string{"--log-format", "xml"}, "--log-format"},
		{[]string{"--dir", t.TempDir(), "--bin-dir", t.TempDir()}, "cairn-mds not found"},
	} {
		var out, errOut bytes.Buffer
		err := run(tc.args, strings.NewReader(""), &out, &errOut)
		if err == nil || !strings.Contains(err.Error()+errOut.String(), tc.want) {
			t.Errorf("%v: %v (stderr %q), want an error about %q", tc.args, err, errOut.String(), tc.want)
		}
	}
}

func TestClean(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pg")
	if err := os.MkdirAll(filepath.Join(dir, "cs0"), 0o755); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	// Not a playground directory: refused, kept.
	if err := run([]string{"--dir", dir, "--clean", "--yes"}, strings.NewReader(""), &out, &out); err == nil {
		t.Fatal("--clean removed a directory without playground.lock")
	}
	if err := os.WriteFile(filepath.Join(dir, "playground.lock"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := run([]string{"--dir", dir, "--clean"}, strings.NewReader("n\n"), &out, &out); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil || !strings.Contains(out.String(), "not removed") {
		t.Fatalf("declined --clean: %v, output %q", err, out.String())
	}
	out.Reset()
	if err := run([]string{"--dir", dir, "--clean"}, strings.NewReader("y\n"), &out, &out); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("confirmed --clean left the directory: %v (output %q)", err, out.String())
	}
	out.Reset()
	if err := run([]string{"--dir", dir, "--clean"}, strings.NewReader(""), &out, &out); err != nil || !strings.Contains(out.String(), "nothing to remove") {
		t.Fatalf("--clean of a missing directory: %v %q", err, out.String())
	}
}
