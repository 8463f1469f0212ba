package chunkfilepool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	fsIocFiemap        = 0xC020660B // _IOWR('f', 11, struct fiemap)
	fiemapFlagSync     = 0x1
	fiemapExtentLast   = 0x1
	fiemapExtentDelay  = 0x4
	fiemapExtentUnwrit = 0x800
	fiemapHeaderLen    = 32
	fiemapExtentLen    = 56
	fiemapMaxExtents   = 256
)

// errNoFiemap says that the filesystem cannot report extents (tmpfs).
var errNoFiemap = errors.New("filesystem does not map extents")

type extent struct {
	logical, length uint64
	flags           uint32
}

// fileExtents returns the file's extents from the FIEMAP ioctl.
func fileExtents(path string) ([]extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := make([]byte, fiemapHeaderLen+fiemapMaxExtents*fiemapExtentLen)
	binary.NativeEndian.PutUint64(buf[0:], 0)          // fm_start
	binary.NativeEndian.PutUint64(buf[8:], ^uint64(0)) // fm_length
	binary.NativeEndian.PutUint32(buf[16:], fiemapFlagSync)
	binary.NativeEndian.PutUint32(buf[24:], fiemapMaxExtents) // fm_extent_count
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		if errno == unix.EOPNOTSUPP || errno == unix.ENOTTY {
			return nil, errNoFiemap
		}
		return nil, fmt.Errorf("fiemap: %w", errno)
	}
	n := int(binary.NativeEndian.Uint32(buf[20:]))
	out := make([]extent, n)
	for i := range n {
		e := buf[fiemapHeaderLen+i*fiemapExtentLen:]
		out[i] = extent{
			logical: binary.NativeEndian.Uint64(e[0:]),
			length:  binary.NativeEndian.Uint64(e[16:]),
			flags:   binary.NativeEndian.Uint32(e[40:]),
		}
	}
	return out, nil
}

// fullyWritten reports why the file's extents do not cover [0, size) with
// written (not unwritten, not delayed) blocks, or "".
func fullyWritten(exts []extent, size uint64) string {
	var next uint64
	for _, e := range exts {
		if e.logical != next {
			return fmt.Sprintf("hole at %d", next)
		}
		if e.flags&(fiemapExtentUnwrit|fiemapExtentDelay) != 0 {
			return fmt.Sprintf("extent at %d has flags %#x (unwritten or delayed)", e.logical, e.flags)
		}
		next = e.logical + e.length
	}
	if next < size {
		return fmt.Sprintf("hole at %d", next)
	}
	return ""
}

// TestPoolFilesAreFullyAllocatedAndWritten checks the property the pool
// exists for: a handed-out file has every block allocated and written, so
// a later overwrite changes no extent. A fallocated file, which the check
// must reject, shows the check can fail.
func TestPoolFilesAreFullyAllocatedAndWritten(t *testing.T) {
	root := t.TempDir()
	o := testOptions(filepath.Join(root, "pool"))
	o.ChunkSize = 1 << 20
	o.InitialChunks = 1
	p := openPool(t, o)
	dst := filepath.Join(root, "chunk")
	if err := p.Get(dst); err != nil {
		t.Fatal(err)
	}
	exts, err := fileExtents(dst)
	if errors.Is(err, errNoFiemap) {
		t.Skipf("%s: %v", root, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if why := fullyWritten(exts, uint64(p.FileSize())); why != "" {
		t.Fatalf("pool file is not fully written: %s (%+v)", why, exts)
	}

	falloc := filepath.Join(root, "fallocated")
	f, err := os.Create(falloc)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, p.FileSize()); err != nil {
		t.Skipf("fallocate: %v", err)
	}
	exts, err = fileExtents(falloc)
	if err != nil {
		t.Fatal(err)
	}
	if why := fullyWritten(exts, uint64(p.FileSize())); why == "" {
		t.Fatalf("a fallocated file passes the check: %+v", exts)
	}
}
