package faultfs

import (
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// gatedFS admits every FUSE request through the FS's gate: while the
// filesystem is crashed every request fails with EIO, and Crash waits for
// the requests in flight before it restores anything, so no request that
// started before the cut can change a file after it. Only the requests that
// free kernel references (FORGET, RELEASE, RELEASEDIR) always pass: a
// process killed before the cut still has its files closed.
type gatedFS struct {
	fuse.RawFileSystem
	fs *FS
}

// run calls op inside the gate.
func (g *gatedFS) run(op func() fuse.Status) fuse.Status {
	if !g.fs.enter() {
		return fuse.EIO
	}
	defer g.fs.exit()
	return op()
}

// runData is run for a request that may add unsynced data: it first waits
// for room under Options.MaxUnsyncedBytes.
func (g *gatedFS) runData(cancel <-chan struct{}, op func() fuse.Status) fuse.Status {
	if st := g.fs.waitRoom(cancel); st != fuse.OK {
		return st
	}
	return g.run(op)
}

func (g *gatedFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Lookup(cancel, h, name, out) })
}

func (g *gatedFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.GetAttr(cancel, in, out) })
}

func (g *gatedFS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	op := func() fuse.Status { return g.RawFileSystem.SetAttr(cancel, in, out) }
	if _, ok := in.GetSize(); ok {
		return g.runData(cancel, op)
	}
	return g.run(op)
}

func (g *gatedFS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Mknod(cancel, in, name, out) })
}

func (g *gatedFS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Mkdir(cancel, in, name, out) })
}

func (g *gatedFS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Unlink(cancel, h, name) })
}

func (g *gatedFS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Rmdir(cancel, h, name) })
}

func (g *gatedFS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Rename(cancel, in, oldName, newName) })
}

func (g *gatedFS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Link(cancel, in, name, out) })
}

func (g *gatedFS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Symlink(cancel, h, target, name, out) })
}

func (g *gatedFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) (out []byte, st fuse.Status) {
	st = g.run(func() fuse.Status {
		out, st = g.RawFileSystem.Readlink(cancel, h)
		return st
	})
	return out, st
}

func (g *gatedFS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Access(cancel, in) })
}

func (g *gatedFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (sz uint32, st fuse.Status) {
	st = g.run(func() fuse.Status {
		sz, st = g.RawFileSystem.GetXAttr(cancel, h, attr, dest)
		return st
	})
	return sz, st
}

func (g *gatedFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (sz uint32, st fuse.Status) {
	st = g.run(func() fuse.Status {
		sz, st = g.RawFileSystem.ListXAttr(cancel, h, dest)
		return st
	})
	return sz, st
}

func (g *gatedFS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.SetXAttr(cancel, in, attr, data) })
}

func (g *gatedFS) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.RemoveXAttr(cancel, h, attr) })
}

func (g *gatedFS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Create(cancel, in, name, out) })
}

func (g *gatedFS) Tmpfile(cancel <-chan struct{}, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	// O_TMPFILE is refused: go-fuse's loopback would hand out an untracked
	// file. Cairn does not use it.
	return fuse.ENOTSUP
}

func (g *gatedFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	op := func() fuse.Status { return g.RawFileSystem.Open(cancel, in, out) }
	if in.Flags&syscall.O_TRUNC != 0 {
		return g.runData(cancel, op)
	}
	return g.run(op)
}

func (g *gatedFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (res fuse.ReadResult, st fuse.Status) {
	st = g.run(func() fuse.Status {
		res, st = g.RawFileSystem.Read(cancel, in, buf)
		return st
	})
	return res, st
}

func (g *gatedFS) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Lseek(cancel, in, out) })
}

func (g *gatedFS) GetLk(cancel <-chan struct{}, in *fuse.LkIn, out *fuse.LkOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.GetLk(cancel, in, out) })
}

func (g *gatedFS) SetLk(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.SetLk(cancel, in) })
}

func (g *gatedFS) SetLkw(cancel <-chan struct{}, in *fuse.LkIn) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.SetLkw(cancel, in) })
}

func (g *gatedFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (n uint32, st fuse.Status) {
	st = g.runData(cancel, func() fuse.Status {
		n, st = g.RawFileSystem.Write(cancel, in, data)
		return st
	})
	return n, st
}

func (g *gatedFS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (n uint32, st fuse.Status) {
	st = g.runData(cancel, func() fuse.Status {
		n, st = g.RawFileSystem.Writev(cancel, in, data)
		return st
	})
	return n, st
}

func (g *gatedFS) CopyFileRange(cancel <-chan struct{}, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	// The kernel falls back to reads and writes, which the layer tracks.
	return 0, fuse.ENOSYS
}

func (g *gatedFS) Ioctl(cancel <-chan struct{}, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	// An ioctl could change data behind the layer's back.
	return fuse.ENOTSUP
}

func (g *gatedFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Flush(cancel, in) })
}

func (g *gatedFS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Fsync(cancel, in) })
}

func (g *gatedFS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	return g.runData(cancel, func() fuse.Status { return g.RawFileSystem.Fallocate(cancel, in) })
}

func (g *gatedFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.OpenDir(cancel, in, out) })
}

func (g *gatedFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.ReadDir(cancel, in, out) })
}

func (g *gatedFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.ReadDirPlus(cancel, in, out) })
}

func (g *gatedFS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.FsyncDir(cancel, in) })
}

func (g *gatedFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.StatFs(cancel, h, out) })
}

func (g *gatedFS) Statx(cancel <-chan struct{}, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	return g.run(func() fuse.Status { return g.RawFileSystem.Statx(cancel, in, out) })
}
