package faultfs

import (
	"context"
	"errors"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// handle is an open file of the mount. It owns go-fuse's loopback file (and
// through it the backing descriptor) and routes every change of data
// through the tracker. It deliberately offers no passthrough descriptor: the
// kernel must send every read and write here.
type handle struct {
	fs       *FS
	inode    *fs.Inode
	lf       *fs.LoopbackFile
	fd       int    // the backing descriptor, owned by lf
	ino      uint64 // backing inode number
	epoch    uint64 // FS epoch at open: the handle dies with a crash
	writable bool
	dsync    bool // opened O_SYNC or O_DSYNC: every write is synced
}

var (
	_ fs.FileReader    = (*handle)(nil)
	_ fs.FileWriter    = (*handle)(nil)
	_ fs.FileWritever  = (*handle)(nil)
	_ fs.FileFsyncer   = (*handle)(nil)
	_ fs.FileFlusher   = (*handle)(nil)
	_ fs.FileReleaser  = (*handle)(nil)
	_ fs.FileGetattrer = (*handle)(nil)
	_ fs.FileStatxer   = (*handle)(nil)
	_ fs.FileLseeker   = (*handle)(nil)
	_ fs.FileAllocater = (*handle)(nil)
)

// newHandle wraps the loopback file fh, opened with backingFlags(flags), and
// applies an O_TRUNC of flags as a tracked truncate.
func (f *FS) newHandle(in *fs.Inode, fh fs.FileHandle, flags uint32) (*handle, syscall.Errno) {
	lf, ok := fh.(*fs.LoopbackFile)
	if !ok {
		return nil, syscall.EIO
	}
	fd, ok := lf.PassthroughFd()
	var st unix.Stat_t
	if !ok || unix.Fstat(fd, &st) != nil {
		lf.Release(context.Background())
		return nil, syscall.EIO
	}
	h := &handle{
		fs: f, inode: in, lf: lf, fd: fd, ino: st.Ino, epoch: f.epoch.Load(),
		writable: flags&syscall.O_ACCMODE != syscall.O_RDONLY,
		dsync:    flags&syscall.O_DSYNC != 0,
	}
	if flags&syscall.O_TRUNC != 0 && h.writable && st.Size > 0 {
		if errno := h.truncate(0); errno != 0 {
			lf.Release(context.Background())
			return nil, errno
		}
	}
	return h, 0
}

// check fails every use of a handle opened before the last crash.
func (h *handle) check() syscall.Errno {
	if h.epoch != h.fs.epoch.Load() {
		return syscall.EIO
	}
	return 0
}

// path is the file's path relative to the mount root.
func (h *handle) path() string { return h.inode.Path(nil) }

// Read reads from the backing file.
func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if errno := h.check(); errno != 0 {
		return nil, errno
	}
	if errno := h.fs.rules.failure(opRead, h.path); errno != 0 {
		h.fs.stats.readFaults.Add(1)
		return nil, errno
	}
	n, err := preadFull(h.fd, dest, off)
	if err != nil {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Write writes to the backing file after saving the pre-images it needs.
func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	return h.Writev(ctx, [][]byte{data}, off)
}

// Writev is Write for data split in several buffers.
func (h *handle) Writev(ctx context.Context, data [][]byte, off int64) (uint32, syscall.Errno) {
	if errno := h.check(); errno != 0 {
		return 0, errno
	}
	if errno := h.fs.rules.failure(opWrite, h.path); errno != 0 {
		h.fs.stats.writeFaults.Add(1)
		return 0, errno
	}
	var size int64
	for _, b := range data {
		size += int64(len(b))
	}
	var n int
	err := h.fs.tr.modify(h.ino, h.fd, h.path, change{off: off, end: off + size, truncTo: -1}, func() error {
		var err error
		for {
			n, err = unix.Pwritev(h.fd, data, off)
			if !errors.Is(err, unix.EINTR) {
				return err
			}
		}
	})
	if err != nil && n <= 0 {
		return 0, toErrno(err)
	}
	h.fs.stats.writes.Add(1)
	if h.dsync {
		if errno := h.fs.syncFile(h, true); errno != 0 {
			return 0, errno
		}
	}
	return uint32(n), 0
}

// Fsync syncs the file (fdatasync when flags has FUSE_FSYNC_FDATASYNC).
func (h *handle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if errno := h.check(); errno != 0 {
		return errno
	}
	return h.fs.syncFile(h, flags&1 != 0)
}

// syncFile makes the file durable and forgets its pre-images, or, when a
// FailSync rule fires, loses its unsynced data and returns EIO.
func (f *FS) syncFile(h *handle, datasync bool) syscall.Errno {
	if r := f.rules.fire(opCrash, h.path); r != nil {
		f.cutPower(r.crash)
		return r.errno
	}
	if errno := f.rules.failure(opSync, h.path); errno != 0 {
		lost, err := f.tr.discard(h.ino)
		f.stats.syncFaults.Add(1)
		f.stats.pagesLostSyncFail.Add(uint64(lost))
		if err != nil {
			f.log.Error("faultfs: failed sync could not restore the file", "path", h.path(), "err", err)
		}
		return errno
	}
	err := f.tr.sync(h.ino, func() error {
		if datasync {
			return unix.Fdatasync(h.fd)
		}
		return unix.Fsync(h.fd)
	})
	if err != nil {
		return toErrno(err)
	}
	f.stats.syncs.Add(1)
	return 0
}

// truncate sets the file's size, tracked.
func (h *handle) truncate(size int64) syscall.Errno {
	return h.fs.truncate(h.fd, h.ino, h.path, size)
}

// truncate sets the size of the backing inode ino, open read-write as fd.
func (f *FS) truncate(fd int, ino uint64, path func() string, size int64) syscall.Errno {
	if size < 0 {
		return syscall.EINVAL
	}
	err := f.tr.modify(ino, fd, path, change{truncTo: size}, func() error { return unix.Ftruncate(fd, size) })
	return toErrno(err)
}

// Allocate runs fallocate: plain (mode 0 or FALLOC_FL_KEEP_SIZE), punching
// a hole or zeroing a range. Modes that move data (collapse, insert) are
// refused.
func (h *handle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	if errno := h.check(); errno != 0 {
		return errno
	}
	c := change{truncTo: -1}
	switch mode {
	case 0, unix.FALLOC_FL_KEEP_SIZE:
		// Only the size may change (past the end of file).
	case unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_ZERO_RANGE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE:
		c.off, c.end = int64(off), int64(off+size)
	default:
		return syscall.EOPNOTSUPP
	}
	if errno := h.fs.rules.failure(opWrite, h.path); errno != 0 {
		h.fs.stats.writeFaults.Add(1)
		return errno
	}
	err := h.fs.tr.modify(h.ino, h.fd, h.path, c, func() error {
		return unix.Fallocate(h.fd, mode, int64(off), int64(size))
	})
	return toErrno(err)
}

// Flush is called on every close of a descriptor; data is already in the
// backing file.
func (h *handle) Flush(ctx context.Context) syscall.Errno { return h.check() }

// Release closes the backing file. It runs even on a crashed filesystem.
func (h *handle) Release(ctx context.Context) syscall.Errno { return h.lf.Release(ctx) }

// Getattr stats the backing file. It works on a handle from before a
// crash too: go-fuse answers a stat of a path through any open handle of
// the inode, and a stat changes nothing.
func (h *handle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	return h.lf.Getattr(ctx, out)
}

// Statx is Getattr for statx(2).
func (h *handle) Statx(ctx context.Context, flags, mask uint32, out *fuse.StatxOut) syscall.Errno {
	return h.lf.Statx(ctx, flags, mask, out)
}

// Lseek serves SEEK_DATA and SEEK_HOLE.
func (h *handle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	if errno := h.check(); errno != 0 {
		return 0, errno
	}
	return h.lf.Lseek(ctx, off, whence)
}

// toErrno maps an error to the errno the kernel passes on (EIO when the
// error carries none).
func toErrno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	return syscall.EIO
}
