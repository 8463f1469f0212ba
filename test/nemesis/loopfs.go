package nemesis

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// LoopFS is a small ext4 filesystem in a file, loop-mounted over a
// directory, that can be filled to the last block and freed again.
type LoopFS struct {
	Image, Dir string
	filler     string
}

// MountLoop creates an image of size bytes, formats it ext4 (no blocks
// reserved for root: the chunkserver runs as root) and loop-mounts it on
// dir.
func MountLoop(image, dir string, size int64) (*LoopFS, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.Create(image)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return nil, err
	}
	if err := cmd("mkfs.ext4", "-q", "-F", "-m", "0", image); err != nil {
		return nil, err
	}
	if err := cmd("mount", "-o", "loop", image, dir); err != nil {
		return nil, err
	}
	return &LoopFS{Image: image, Dir: dir, filler: filepath.Join(dir, "nemesis-filler")}, nil
}

// Fill takes every free block with a filler file; it returns the bytes
// taken.
func (l *LoopFS) Fill() (int64, error) {
	f, err := os.OpenFile(l.filler, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, _ := f.Stat()
	size := st.Size()
	// Shrinking steps: the last extents may not fit one big request.
	for step := int64(64 << 20); step >= 4096; step /= 2 {
		for {
			if err := unix.Fallocate(int(f.Fd()), 0, size, step); err != nil {
				break
			}
			size += step
		}
	}
	if err := f.Sync(); err != nil {
		return size, err
	}
	return size, nil
}

// Free removes the filler file.
func (l *LoopFS) Free() error {
	if err := os.Remove(l.filler); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// FreeBytes returns the space available on the filesystem.
func (l *LoopFS) FreeBytes() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(l.Dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// Unmount unmounts the filesystem (lazily if busy), detaches its loop
// device and removes the image.
func (l *LoopFS) Unmount() error {
	var errs []error
	if err := cmd("umount", l.Dir); err != nil {
		if err2 := cmd("umount", "-l", l.Dir); err2 != nil {
			errs = append(errs, err, err2)
		}
	}
	// mount -o loop sets autoclear; detach whatever is left anyway.
	if out, err := exec.Command("losetup", "-j", l.Image).Output(); err == nil {
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if dev, _, ok := strings.Cut(line, ":"); ok && dev != "" {
				if err := cmd("losetup", "-d", dev); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	if err := os.Remove(l.Image); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func cmd(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
