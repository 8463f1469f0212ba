package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Loop devices are managed with util-linux's losetup, which knows how to
// find a free device and create its node.

// loopAttach backs a free loop device with file, with sectors of sector
// bytes, and returns its path.
func loopAttach(ctx context.Context, file string, sector int64, readOnly bool) (string, error) {
	args := []string{"--find", "--show", "--sector-size", strconv.FormatInt(sector, 10)}
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

// fileID identifies the file behind a loop device: its device and inode
// numbers as LOOP_GET_STATUS64 reports them. A path does not: the kernel
// reports the path it resolved, which differs from the one given through a
// symbolic link, and is cut short once the file's mount is detached.
type fileID struct {
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// idOf is the fileID of path.
func idOf(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, fmt.Errorf("stat %s: %w", path, err)
	}
	return fileID{Dev: st.Dev, Ino: st.Ino}, nil
}

// loopState says what backs a loop device.
type loopState int

const (
	loopFree    loopState = iota // nothing (or no such device)
	loopBound                    // a file, whose id loopBacking returns
	loopUnknown                  // a file the kernel cannot stat (its FUSE connection died)
)

// loopBacking says what backs a loop device.
func loopBacking(dev string) (fileID, loopState) {
	f, err := os.Open(dev)
	if err != nil {
		return fileID{}, loopFree
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	switch {
	case errors.Is(err, unix.ENXIO):
		return fileID{}, loopFree
	case err != nil:
		return fileID{}, loopUnknown
	}
	return fileID{Dev: info.Device, Ino: info.Inode}, loopBound
}

// loopDetach frees dev if it is still backed by the file with id (at
// path): by id while the kernel can tell it, by path (as sysfs shows it)
// when the file's FUSE connection is dead. Detaching what is already
// detached, or was reused for another file, does nothing.
func loopDetach(ctx context.Context, dev string, id fileID, path string) error {
	if dev == "" {
		return nil
	}
	switch cur, st := loopBacking(dev); st {
	case loopFree:
		return nil
	case loopBound:
		if cur != id {
			return nil
		}
	case loopUnknown:
		b, err := os.ReadFile("/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/loop/backing_file")
		if err != nil || strings.TrimSpace(string(b)) != path {
			return nil
		}
	}
	_, err := run(ctx, "losetup", "--detach", dev)
	return err
}

// deviceBusy reports whether something holds the block device dev open
// exclusively: a mounted file system does.
func deviceBusy(dev string) bool {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Is(err, unix.EBUSY)
	}
	unix.Close(fd)
	return false
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
