package fsutil

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// RenameNoReplace renames oldpath to newpath atomically and fails with an
// error wrapping fs.ErrExist when newpath already exists: an existing file is
// never overwritten. Both paths must be on the same filesystem; across
// filesystems the error wraps unix.EXDEV. The caller makes the rename durable
// with SyncDir on both parent directories.
func RenameNoReplace(oldpath, newpath string) error {
	return RenameatNoReplace(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath)
}

// RenameatNoReplace is RenameNoReplace with paths relative to open directory
// descriptors (unix.AT_FDCWD for the working directory).
func RenameatNoReplace(olddirfd int, oldpath string, newdirfd int, newpath string) error {
	for {
		err := unix.Renameat2(olddirfd, oldpath, newdirfd, newpath, unix.RENAME_NOREPLACE)
		if err == nil {
			return nil
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return &os.LinkError{Op: "renameat2", Old: oldpath, New: newpath, Err: err}
	}
}

// IsExist reports whether err says that the target of a rename or create
// exists.
func IsExist(err error) bool { return errors.Is(err, fs.ErrExist) }

// SyncDir fsyncs the directory at path, making the creates, renames and
// removes of its entries durable.
func SyncDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync dir %s: %w", path, err)
	}
	return nil
}

// WriteFileAtomic replaces the file at path with data durably: the data goes
// to a temporary file in the same directory, which is fsynced, renamed over
// path, and the directory is fsynced. After a crash path holds either the old
// or the new content, never a mix. The temporary file is removed on failure.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmpName := tmp.Name()
	fail := func(err error) error {
		_ = tmp.Close()
		_ = os.Remove(tmpName)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fail(err)
	}
	if err := tmp.Chmod(perm); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(err)
	}
	if err := tmp.Close(); err != nil {
		_ = os.Remove(tmpName)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmpName, path); err != nil {
		_ = os.Remove(tmpName)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return SyncDir(dir)
}

// IsNoSpace reports whether err says that the filesystem is full (ENOSPC) or
// a quota is exhausted (EDQUOT).
func IsNoSpace(err error) bool {
	return errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT)
}

// FreeBytes returns the bytes an unprivileged writer may still allocate on
// the filesystem holding path (statfs f_bavail * f_bsize).
func FreeBytes(path string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}
