package attach

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Loop devices are managed with util-linux's losetup, which knows how to
// find a free device and create its node.

// loopAttach backs a free loop device with file and returns its path.
func loopAttach(ctx context.Context, file string, readOnly bool) (string, error) {
	args := []string{"--find", "--show"}
	if readOnly {
		args = append(args, "--read-only")
	}
	out, err := run(ctx, "losetup", append(args, file)...)
	if err != nil {
		return "", err
	}
	dev := strings.TrimSpace(out)
	if !strings.HasPrefix(dev, "/dev/loop") {
		return "", fmt.Errorf("losetup printed %q, not a loop device", dev)
	}
	return dev, nil
}

// loopBackingFile is the file behind a loop device ("" when the device is
// free or does not exist).
func loopBackingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// loopDetach frees dev if file still backs it; detaching what is already
// detached (or reused for another file) does nothing.
func loopDetach(ctx context.Context, dev, file string) error {
	if dev == "" || loopBackingFile(dev) != file {
		return nil
	}
	_, err := run(ctx, "losetup", "--detach", dev)
	return err
}

// loopSetCapacity makes dev take the current size of its file.
func loopSetCapacity(ctx context.Context, dev string) error {
	_, err := run(ctx, "losetup", "--set-capacity", dev)
	return err
}

// run runs a tool and returns its output, or an error with what it said.
func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
