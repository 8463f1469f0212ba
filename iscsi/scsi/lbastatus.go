package scsi

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"

	"cairn.io/cairn/blockdev"
)

// getLBAStatus describes the blocks from the requested LBA as mapped or
// deallocated. A backend with a map of its holes (blockdev.Mapper, what NBD's
// block status answers from) is asked for it: as many descriptors as the
// allocation length holds (at least one, at most maxLBAStatusDescriptors)
// over what the map covers. Otherwise the blocks are read: those that read as
// zeros are reported deallocated (with LBPRZ set they are indistinguishable)
// and the others mapped, in one descriptor; at most zeroScanBytes are read.
func (lu *LogicalUnit) getLBAStatus(ctx context.Context, cdb []byte, blocks uint64) Response {
	lba := binary.BigEndian.Uint64(cdb[2:10])
	alloc := int(binary.BigEndian.Uint32(cdb[10:14]))
	if lba >= blocks {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if lu.mapper == nil {
		return lu.scanLBAStatus(ctx, lba, alloc, blocks)
	}
	off, length := int64(lba)<<lu.bsShift, int64(blocks-lba)<<lu.bsShift
	ext, err := lu.mapper.Map(ctx, off, length)
	if err != nil {
		return lu.readErr("get lba status", lba, err)
	}
	runs, err := lu.blockRuns(ext, off, length)
	if err != nil {
		return lu.readErr("get lba status", lba, err)
	}
	n := min(len(runs), max(1, (alloc-8)/16), maxLBAStatusDescriptors)
	out := make([]byte, 8+16*n)
	binary.BigEndian.PutUint32(out[0:4], uint32(4+16*n))
	for i, r := range runs[:n] {
		d := out[8+16*i:]
		binary.BigEndian.PutUint64(d[0:8], lba)
		binary.BigEndian.PutUint32(d[8:12], r.blocks)
		if r.deallocated {
			d[12] = 1
		}
		lba += uint64(r.blocks)
	}
	return allocate(out, alloc)
}

// lbaRun is what one LBA status descriptor tells: a run of blocks, mapped or
// deallocated.
type lbaRun struct {
	blocks      uint32
	deallocated bool
}

// blockRuns turns a map of [off, off+length) into runs of whole blocks from
// off's: a block is deallocated only where the map has a hole over all of it
// (a block partly data is mapped); runs longer than a descriptor holds are
// split. The map must describe at least one byte and no more than asked.
func (lu *LogicalUnit) blockRuns(ext []blockdev.Extent, off, length int64) ([]lbaRun, error) {
	var runs []lbaRun
	add := func(blocks int64, hole bool) {
		for blocks > 0 {
			if k := len(runs) - 1; k >= 0 && runs[k].deallocated == hole && runs[k].blocks < math.MaxUint32 {
				n := min(blocks, int64(math.MaxUint32-runs[k].blocks))
				runs[k].blocks += uint32(n)
				blocks -= n
				continue
			}
			n := min(blocks, math.MaxUint32)
			runs = append(runs, lbaRun{blocks: uint32(n), deallocated: hole})
			blocks -= n
		}
	}
	pos, done := off, off // bytes mapped; blocks described up to done
	for i, e := range ext {
		if e.Length <= 0 || pos-off+e.Length > length {
			return nil, fmt.Errorf("the device mapped extent %d of %d bytes at %d for a %d-byte request", i, e.Length, pos, length)
		}
		pos += e.Length
		// Blocks wholly inside a hole are deallocated; a data extent
		// takes every block it touches.
		end := pos / lu.bs * lu.bs
		if !e.Hole {
			end = (pos + lu.bs - 1) / lu.bs * lu.bs
		}
		if end > done {
			add((end-done)>>lu.bsShift, e.Hole)
			done = end
		}
	}
	if len(runs) == 0 {
		return nil, fmt.Errorf("the device mapped less than a block at %d", off)
	}
	return runs, nil
}

// scanLBAStatus reports one extent starting at lba, found by reading at most
// zeroScanBytes: blocks that read as zeros are deallocated.
func (lu *LogicalUnit) scanLBAStatus(ctx context.Context, lba uint64, alloc int, blocks uint64) Response {
	scan := min(uint64(zeroScanBytes)>>lu.bsShift, blocks-lba)
	buf := make([]byte, scan<<lu.bsShift)
	if err := lu.readAt(ctx, buf, lba); err != nil {
		return lu.readErr("get lba status", lba, err)
	}
	first := allZero(buf[:lu.bs])
	run := uint64(1)
	for ; run < scan; run++ {
		off := int64(run) << lu.bsShift
		if allZero(buf[off:off+lu.bs]) != first {
			break
		}
	}
	out := make([]byte, 24)
	binary.BigEndian.PutUint32(out[0:4], 20)
	binary.BigEndian.PutUint64(out[8:16], lba)
	binary.BigEndian.PutUint32(out[16:20], uint32(run))
	if first {
		out[20] = 1 // deallocated
	}
	return allocate(out, alloc)
}
