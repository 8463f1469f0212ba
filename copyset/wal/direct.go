package wal

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// Group commits go to the segment with O_DIRECT where the filesystem allows
// it: the log is written once and read back only by recovery, so copying
// every batch into the page cache, writing the pages back in the
// fdatasync and keeping them cached bought nothing. Durability is
// unchanged: fdatasync after the write still flushes the disk's cache,
// for direct and buffered writes alike. A write qualifies when its offset,
// length and buffer are page aligned: each batch is padded to a page and
// begins with the bytes of the log already in its first page (writer.go),
// so all do but the last of a segment whose size is not a whole number of
// pages. Others, and every write where the filesystem refuses O_DIRECT
// (some FUSE filesystems) or the device wants a larger alignment, go
// through the page cache. (tmpfs takes O_DIRECT and keeps the pages: it has
// nothing else.)

// writeSegment writes p at off of seg.
func writeSegment(seg *segment, p []byte, off int64) error {
	if d := seg.directFile(); d != nil && directAligned(p, off) {
		_, err := d.WriteAt(p, off)
		if err == nil || !errors.Is(err, unix.EINVAL) {
			return err
		}
		// The device wants a larger alignment than a page.
		seg.closeDirect()
		seg.noDirect = true
	}
	_, err := fsutil.WriteAtInPieces(seg.f, p, off)
	return err
}

// directFile returns seg's O_DIRECT descriptor, opening it at first use, or
// nil when the filesystem refuses one.
func (seg *segment) directFile() *os.File {
	if seg.direct == nil && !seg.noDirect {
		seg.direct = fsutil.OpenDirect(seg.path)
		seg.noDirect = seg.direct == nil
	}
	return seg.direct
}

// closeFiles closes seg's descriptors.
func (seg *segment) closeFiles() {
	seg.closeDirect()
	if seg.f != nil {
		seg.f.Close()
		seg.f = nil
	}
}

func (seg *segment) closeDirect() {
	if seg.direct != nil {
		seg.direct.Close()
		seg.direct = nil
	}
}

// directAligned reports whether p at off meets O_DIRECT's alignment.
func directAligned(p []byte, off int64) bool {
	return len(p) > 0 && off%pageSize == 0 && len(p)%pageSize == 0 && fsutil.Aligned(p)
}
