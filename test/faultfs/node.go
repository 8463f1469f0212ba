package faultfs

import (
	"context"
	"path/filepath"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// node is a file or directory of the mount: go-fuse's loopback node, with
// the operations that change file data routed through the tracker and every
// open file given a tracking handle.
type node struct {
	*fs.LoopbackNode
	fs *FS
}

var (
	_ fs.NodeWrapChilder    = (*node)(nil)
	_ fs.NodeOpener         = (*node)(nil)
	_ fs.NodeCreater        = (*node)(nil)
	_ fs.NodeSetattrer      = (*node)(nil)
	_ fs.NodeUnlinker       = (*node)(nil)
	_ fs.NodeRenamer        = (*node)(nil)
	_ fs.NodeOpendirHandler = (*node)(nil)
)

// WrapChild makes every node the loopback creates (on lookup, create,
// mkdir, ...) a faultfs node.
func (n *node) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &node{LoopbackNode: ops.(*fs.LoopbackNode), fs: n.fs}
}

// relPath is the node's path relative to the mount root.
func (n *node) relPath() string { return n.EmbeddedInode().Path(nil) }

// backingPath is the path of the child name in the backing directory.
func (n *node) backingPath(name string) string {
	return filepath.Join(n.RootData.Path, n.relPath(), name)
}

// backingFlags are the flags the backing file is opened with: always
// readable when writable (pre-images are read through the same
// descriptor), never truncated by the open itself (the layer truncates, so
// the truncate is tracked), never O_DIRECT (the layer reads and writes with
// unaligned buffers; the kernel caches nothing above it anyway) and never
// O_APPEND (the kernel computes append offsets).
func backingFlags(flags uint32) uint32 {
	flags &^= syscall.O_TRUNC | syscall.O_DIRECT | syscall.O_APPEND
	if flags&syscall.O_ACCMODE == syscall.O_WRONLY {
		flags = flags&^syscall.O_ACCMODE | syscall.O_RDWR
	}
	return flags
}

// Open opens the backing file and returns a tracking handle in direct-IO
// mode, so that every read and write of the file reaches this server.
func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, _, errno := n.LoopbackNode.Open(ctx, backingFlags(flags))
	if errno != 0 {
		return nil, 0, errno
	}
	h, errno := n.fs.newHandle(n.EmbeddedInode(), fh, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return h, fuse.FOPEN_DIRECT_IO, 0
}

// Create creates the backing file like Open.
func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	ch, fh, _, errno := n.LoopbackNode.Create(ctx, name, backingFlags(flags), mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	h, errno := n.fs.newHandle(ch, fh, flags)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return ch, h, fuse.FOPEN_DIRECT_IO, 0
}

// Setattr changes attributes; a size change is a tracked truncate.
func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	var inner fs.FileHandle
	h, _ := f.(*handle)
	if h != nil {
		if errno := h.check(); errno != 0 {
			return errno
		}
		inner = h.lf
	}
	if size, ok := in.GetSize(); ok {
		var errno syscall.Errno
		if h != nil && h.writable {
			errno = h.truncate(int64(size))
		} else {
			errno = n.truncatePath(int64(size))
		}
		if errno != 0 {
			return errno
		}
		rest := *in
		rest.Valid &^= fuse.FATTR_SIZE
		in = &rest
	}
	return n.LoopbackNode.Setattr(ctx, inner, in, out)
}

// truncatePath truncates the node's backing file by path (truncate(2), or
// an ftruncate on a read-only descriptor).
func (n *node) truncatePath(size int64) syscall.Errno {
	fd, err := unix.Open(filepath.Join(n.RootData.Path, n.relPath()), unix.O_RDWR|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return fs.ToErrno(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fs.ToErrno(err)
	}
	return n.fs.truncate(fd, st.Ino, n.relPath, size)
}

// Unlink removes a name; a file left without names has nothing a crash
// could bring back, so its pre-images are dropped.
func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	ino, ok := regularIno(n.backingPath(name))
	errno := n.LoopbackNode.Unlink(ctx, name)
	if errno == 0 && ok {
		n.fs.tr.forgetIfOrphan(ino)
	}
	return errno
}

// Rename renames (flags: RENAME_NOREPLACE, RENAME_EXCHANGE pass through to
// renameat2); a file replaced by the rename is treated as by Unlink.
func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	var ino uint64
	var ok bool
	if np, isNode := newParent.(*node); isNode && flags == 0 {
		ino, ok = regularIno(np.backingPath(newName))
	}
	errno := n.LoopbackNode.Rename(ctx, name, newParent, newName, flags)
	if errno == 0 && ok {
		n.fs.tr.forgetIfOrphan(ino)
	}
	return errno
}

// regularIno returns the inode number of the regular file at path.
func regularIno(path string) (uint64, bool) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		return 0, false
	}
	return st.Ino, true
}

// OpendirHandle opens a directory with a handle that is refused after a
// crash and counts directory syncs.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.OpendirHandle(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{fs: n.fs, inner: fh, epoch: n.fs.epoch.Load()}, fl, 0
}

// dirHandle is an open directory.
type dirHandle struct {
	fs    *FS
	inner fs.FileHandle
	epoch uint64
}

var (
	_ fs.FileReaddirenter = (*dirHandle)(nil)
	_ fs.FileSeekdirer    = (*dirHandle)(nil)
	_ fs.FileFsyncdirer   = (*dirHandle)(nil)
	_ fs.FileReleasedirer = (*dirHandle)(nil)
)

func (d *dirHandle) check() syscall.Errno {
	if d.epoch != d.fs.epoch.Load() {
		return syscall.EIO
	}
	return 0
}

// Readdirent reads the next entry.
func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	if errno := d.check(); errno != 0 {
		return nil, errno
	}
	return d.inner.(fs.FileReaddirenter).Readdirent(ctx)
}

// Seekdir rewinds or seeks the directory.
func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	if errno := d.check(); errno != 0 {
		return errno
	}
	return d.inner.(fs.FileSeekdirer).Seekdir(ctx, off)
}

// Fsyncdir fsyncs the backing directory.
func (d *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	if errno := d.check(); errno != 0 {
		return errno
	}
	errno := d.inner.(fs.FileFsyncdirer).Fsyncdir(ctx, flags)
	if errno == 0 {
		d.fs.stats.dirSyncs.Add(1)
	}
	return errno
}

// Releasedir closes the backing directory.
func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {
	d.inner.(fs.FileReleasedirer).Releasedir(ctx, flags)
}
