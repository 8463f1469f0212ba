package attach

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"cairn.io/cairn/blockdev"
)

// FileName is the name of the volume's file in the FUSE mount.
const FileName = "volume"

// minSector is the smallest sector a loop device has, and the sector of
// volumes that say nothing of their block size.
const minSector = 512

// maxSector is the largest sector a loop device takes.
const maxSector = 4096

// blockSizer is implemented by devices with a block size (client.Volume):
// the loop device's sectors are that size, so that every IO it issues is
// one the volume takes.
type blockSizer interface {
	BlockSize() int64
}

// sectorOf is dev's IO granularity through the file and the loop device.
func sectorOf(dev blockdev.Device) (int64, error) {
	b, ok := dev.(blockSizer)
	if !ok || b.BlockSize() <= minSector {
		return minSector, nil
	}
	bs := b.BlockSize()
	if bs > maxSector || bs&(bs-1) != 0 {
		return 0, fmt.Errorf("the volume's block size %d is not one a loop device takes (a power of two up to %d)", bs, maxSector)
	}
	return bs, nil
}

// fallocate modes (linux/falloc.h).
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// volumeRoot is the mount's root directory: it holds the one file.
type volumeRoot struct {
	fs.Inode
	file *volumeFile
}

var _ fs.NodeOnAdder = (*volumeRoot)(nil)

// OnAdd adds the volume's file.
func (r *volumeRoot) OnAdd(ctx context.Context) {
	ch := r.NewPersistentInode(ctx, r.file, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
	r.AddChild(FileName, ch, false)
}

// volumeFile is the volume as a file: its size is the volume's, its bytes
// the volume's.
type volumeFile struct {
	fs.Inode
	dev      blockdev.Device
	sector   int64 // IO granularity (sectorOf)
	readOnly bool
	log      *slog.Logger
}

var (
	_ fs.NodeGetattrer = (*volumeFile)(nil)
	_ fs.NodeSetattrer = (*volumeFile)(nil)
	_ fs.NodeOpener    = (*volumeFile)(nil)
	_ fs.NodeReader    = (*volumeFile)(nil)
	_ fs.NodeWriter    = (*volumeFile)(nil)
	_ fs.NodeFsyncer   = (*volumeFile)(nil)
	_ fs.NodeFlusher   = (*volumeFile)(nil)
	_ fs.NodeAllocater = (*volumeFile)(nil)
)

func (f *volumeFile) attr(out *fuse.Attr) {
	out.Mode = syscall.S_IFREG | 0o600
	if f.readOnly {
		out.Mode = syscall.S_IFREG | 0o400
	}
	size := uint64(f.dev.Size())
	out.Size = size
	out.Blocks = (size + minSector - 1) / minSector // st_blocks counts 512-byte units
	out.Blksize = 4096
	out.Nlink = 1
}

// Getattr reports the volume's current size.
func (f *volumeFile) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.attr(&out.Attr)
	return 0
}

// Setattr refuses every change but a truncate to the current size (what
// opening with O_TRUNC of an empty change asks): a volume's size changes
// only through the MDS.
func (f *volumeFile) Setattr(_ context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != f.dev.Size() {
		return syscall.EPERM
	}
	f.attr(&out.Attr)
	return 0
}

// Open opens the file for direct IO: the kernel sends every read and write
// here instead of caching the file's pages (the file system on the loop
// device has its own cache), and lets writes run in parallel.
func (f *volumeFile) Open(_ context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if f.readOnly && flags&(syscall.O_WRONLY|syscall.O_RDWR) != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

// Read reads from the volume; a read past the end is short.
func (f *volumeFile) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := f.dev.Size()
	if off >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := int64(len(dest))
	if off+n > size {
		n = size - off
	}
	if off%f.sector != 0 || n%f.sector != 0 {
		return nil, syscall.EINVAL
	}
	if _, err := f.dev.ReadAt(ctx, dest[:n], off); err != nil {
		return nil, f.errno("read", off, n, err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Write writes to the volume and returns once the write is durable on a
// quorum of replicas.
func (f *volumeFile) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if f.readOnly {
		return 0, syscall.EROFS
	}
	n := int64(len(data))
	switch {
	case off+n > f.dev.Size():
		return 0, syscall.ENOSPC
	case off%f.sector != 0 || n%f.sector != 0:
		return 0, syscall.EINVAL
	}
	if _, err := f.dev.WriteAt(ctx, data, off); err != nil {
		return 0, f.errno("write", off, n, err)
	}
	return uint32(n), 0
}

// Fsync flushes the volume (a flush of the loop device ends here).
func (f *volumeFile) Fsync(ctx context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	if err := f.dev.Flush(ctx); err != nil {
		return f.errno("flush", 0, 0, err)
	}
	return 0
}

// Flush is called at every close of the file; it reports a handle that can
// no longer write, as close(2) should.
func (f *volumeFile) Flush(ctx context.Context, _ fs.FileHandle) syscall.Errno {
	return f.Fsync(ctx, nil, 0)
}

// Allocate unmaps the range for a hole punch or zeroing (a discard or
// write-zeroes of the loop device). Preallocation succeeds without doing
// anything: the cluster allocates on first write.
func (f *volumeFile) Allocate(ctx context.Context, _ fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if f.readOnly {
		return syscall.EROFS
	}
	end := off + size
	if end > uint64(f.dev.Size()) || end < off {
		return syscall.ENOSPC
	}
	switch {
	case mode == 0 || mode == fallocKeepSize:
		return 0
	case mode&(fallocPunchHole|fallocZeroRange) != 0 && mode&^(fallocPunchHole|fallocZeroRange|fallocKeepSize) == 0:
		if int64(off)%f.sector != 0 || int64(size)%f.sector != 0 {
			return syscall.EINVAL
		}
		if err := f.dev.UnmapAt(ctx, int64(off), int64(size)); err != nil {
			return f.errno("unmap", int64(off), int64(size), err)
		}
		return 0
	}
	return syscall.EOPNOTSUPP
}

// errno logs a failed IO and turns it into the errno the kernel passes on.
func (f *volumeFile) errno(op string, off, n int64, err error) syscall.Errno {
	if errors.Is(err, context.Canceled) {
		return syscall.EINTR
	}
	f.log.Error("volume IO failed", "op", op, "offset", off, "length", n, "err", err)
	return syscall.EIO
}
