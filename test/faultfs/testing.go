package faultfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Available reports whether this process can mount a faultfs: nil, or why
// not. Mounting needs root (the mount(2) of a FUSE filesystem) and a usable
// /dev/fuse.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("mounting a FUSE filesystem needs root")
	}
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cannot open /dev/fuse: %w", err)
	}
	return f.Close()
}

// RequireFUSE skips the test when faultfs cannot be mounted here, saying
// why, unless the environment variable CI is set: then the test fails, so
// that CI is never green by skipping.
func RequireFUSE(t testing.TB) {
	t.Helper()
	err := Available()
	if err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("faultfs: FUSE is required when CI is set: %v", err)
	}
	t.Skipf("faultfs: skipped, FUSE not available: %v", err)
}

// MountForTest mounts a faultfs over a new, empty backing directory, both
// under t.TempDir(), and unmounts it when the test ends (lazily if
// something still holds a file in it, so that no mount outlives the test;
// the test then fails). It skips or fails like RequireFUSE.
func MountForTest(t testing.TB, opts Options) *FS {
	t.Helper()
	RequireFUSE(t)
	base := t.TempDir()
	backing, mnt := filepath.Join(base, "backing"), filepath.Join(base, "mnt")
	for _, d := range []string{backing, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatalf("faultfs: %v", err)
		}
	}
	f, err := Mount(backing, mnt, opts)
	if err != nil {
		t.Fatalf("faultfs: %v", err)
	}
	// Registered after t.TempDir's removal, so it runs before it.
	t.Cleanup(func() {
		if err := f.Unmount(); err != nil {
			t.Errorf("faultfs: %v", err)
		}
	})
	return f
}

// Path joins elem to the mount point.
func (f *FS) Path(elem ...string) string {
	return filepath.Join(append([]string{f.mountpoint}, elem...)...)
}

// BackingPath joins elem to the backing directory.
func (f *FS) BackingPath(elem ...string) string {
	return filepath.Join(append([]string{f.backing}, elem...)...)
}
