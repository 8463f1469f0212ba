package fsutil

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirectAlign is the alignment of offset, length and memory that Cairn keeps
// for O_DIRECT writes: a page, the largest logical block size of common
// disks. A device that wants more refuses the write with EINVAL.
const DirectAlign = 4096

// OpenDirect opens path for O_DIRECT writes, or returns nil when the
// filesystem refuses O_DIRECT (some FUSE filesystems). An fsync through any
// descriptor of the file covers what was written through this one.
func OpenDirect(path string) *os.File {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), path)
}

// AlignedBuffer returns n zero bytes whose memory starts at a DirectAlign
// boundary, as O_DIRECT requires of a buffer.
func AlignedBuffer(n int) []byte {
	b := make([]byte, n+DirectAlign)
	skip := int(-uintptr(unsafe.Pointer(unsafe.SliceData(b))) & (DirectAlign - 1))
	return b[skip : skip+n : skip+n]
}

// Aligned reports whether p's memory starts at a DirectAlign boundary.
func Aligned(p []byte) bool {
	return uintptr(unsafe.Pointer(unsafe.SliceData(p)))%DirectAlign == 0
}
