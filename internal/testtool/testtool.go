package testtool

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// packages names the Debian package that provides each tool the tests run;
// the list of packages itself lives in .ci/packages.
var packages = map[string]string{
	"fio":                  "fio",
	"qemu-img":             "qemu-utils (and qemu-block-extra for iscsi://)",
	"qemu-io":              "qemu-utils (and qemu-block-extra for iscsi://)",
	"nbdcopy":              "libnbd-bin",
	"nbdinfo":              "libnbd-bin",
	"nbdsh":                "libnbd-bin",
	"nbdkit":               "nbdkit",
	"iscsi-ls":             "libiscsi-bin",
	"iscsi-inq":            "libiscsi-bin",
	"iscsi-readcapacity16": "libiscsi-bin",
	"iscsi-test-cu":        "libiscsi-bin",
	"iscsi-perf":           "libiscsi-bin",
	"iscsi-swp":            "libiscsi-bin",
	"tgtd":                 "tgt",
	"tgtadm":               "tgt",
	"mkfs.ext4":            "e2fsprogs",
	"mkfs.xfs":             "xfsprogs",
	"nft":                  "nftables",
	"ip":                   "iproute2",
}

// Package is the Debian package that provides tool, or "" if unknown.
func Package(tool string) string { return packages[tool] }

// InCI reports whether the tests run in CI (CI set in the environment),
// where a missing tool is an error rather than a reason to skip.
func InCI() bool { return os.Getenv("CI") != "" }

// Need makes sure every tool is installed. A missing one skips the test,
// naming the package to install, or fails it in CI.
func Need(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			msg := tool + " is not installed"
			if p := Package(tool); p != "" {
				msg += " (Debian package " + p + "; make test installs what .ci/packages lists)"
			}
			if InCI() {
				t.Fatal(msg)
			}
			t.Skip(msg)
		}
	}
}

// Run runs a tool with a deadline in a scratch directory (tools such as fio
// leave state files in their working directory) and returns its combined
// output. A run cut by the deadline returns an error that says so.
func Run(t testing.TB, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s timed out after %s: %w", name, timeout, ctx.Err())
	}
	return string(out), err
}

// MustRun is Run that fails the test when the tool fails.
func MustRun(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := Run(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// RandomFile writes size random bytes to path and returns them.
func RandomFile(t testing.TB, path string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}
