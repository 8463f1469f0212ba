package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
)

// rwFields extracts LBA, block count and the flags byte of a READ, WRITE,
// VERIFY, WRITE AND VERIFY, ORWRITE or PRE-FETCH CDB.
func rwFields(cdb []byte) (lba uint64, n uint32) {
	switch len(cdb) {
	case 6:
		lba = uint64(cdb[1]&0x1f)<<16 | uint64(cdb[2])<<8 | uint64(cdb[3])
		n = uint32(cdb[4])
		if n == 0 {
			n = 256
		}
	case 10:
		lba = uint64(binary.BigEndian.Uint32(cdb[2:6]))
		n = uint32(binary.BigEndian.Uint16(cdb[7:9]))
	case 12:
		lba = uint64(binary.BigEndian.Uint32(cdb[2:6]))
		n = binary.BigEndian.Uint32(cdb[6:10])
	case 16:
		lba = binary.BigEndian.Uint64(cdb[2:10])
		n = binary.BigEndian.Uint32(cdb[10:14])
	}
	return lba, n
}

// writeSameFields extracts LBA and block count of WRITE SAME (10/16).
func writeSameFields(cdb []byte) (lba uint64, n uint32) {
	if cdb[0] == opWriteSame10 {
		return uint64(binary.BigEndian.Uint32(cdb[2:6])), uint32(binary.BigEndian.Uint16(cdb[7:9]))
	}
	return binary.BigEndian.Uint64(cdb[2:10]), binary.BigEndian.Uint32(cdb[10:14])
}

// dataOutLen returns the data-out length the CDB describes.
func (lu *LogicalUnit) dataOutLen(cdb []byte) int {
	switch cdb[0] {
	case opWrite6, opWrite10, opWrite12, opWrite16, opWriteVerify10, opWriteVerify12, opWriteVerify16, opOrWrite16:
		_, n := rwFields(cdb)
		return int(n) * int(lu.bs)
	case opVerify10, opVerify12, opVerify16:
		_, n := rwFields(cdb)
		switch (cdb[1] >> 1) & 0x03 {
		case 1:
			return int(n) * int(lu.bs)
		case 3:
			return int(lu.bs)
		}
	case opCompareAndWrite:
		return 2 * int(cdb[13]) * int(lu.bs)
	case opWriteSame10:
		return int(lu.bs)
	case opWriteSame16:
		if cdb[1]&0x01 != 0 {
			return 0
		}
		return int(lu.bs)
	case opUnmap, opModeSelect10:
		return int(binary.BigEndian.Uint16(cdb[7:9]))
	case opModeSelect6:
		return int(cdb[4])
	case opPersistReserveOut:
		return int(binary.BigEndian.Uint32(cdb[5:9]))
	}
	return 0
}

// DataInLen returns the size of the buffers the command allocates in the
// unit: the data-in of READ, the medium read of VERIFY with BYTCHK, COMPARE
// AND WRITE and ORWRITE, the pattern buffer of WRITE SAME and the scan of
// GET LBA STATUS, so a transport can account for them before running the
// command; 0 for other commands (their data-in is at most a few KiB) and for
// transfers the unit refuses as too long.
func (lu *LogicalUnit) DataInLen(cdb []byte) int {
	if len(cdb) == 0 || cdbLen(cdb[0]) == 0 || len(cdb) < cdbLen(cdb[0]) {
		return 0
	}
	cdb = cdb[:cdbLen(cdb[0])]
	var n uint32
	switch cdb[0] {
	case opRead6, opRead10, opRead12, opRead16, opOrWrite16:
		_, n = rwFields(cdb)
	case opVerify10, opVerify12, opVerify16:
		if (cdb[1]>>1)&0x03 != 0 {
			_, n = rwFields(cdb)
		}
	case opCompareAndWrite:
		n = uint32(cdb[13])
	case opWriteSame10, opWriteSame16:
		_, count := writeSameFields(cdb)
		if cdb[1]&0x08 != 0 || count > lu.maxWS {
			return 0
		}
		return int(min(int64(count)<<lu.bsShift, writeSameChunk))
	case opServiceActionIn16:
		if cdb[1]&0x1f == saGetLBAStatus && lu.mapper == nil {
			return zeroScanBytes
		}
	}
	if n > lu.maxXfer {
		return 0
	}
	return int(n) << lu.bsShift
}

// inRange reports whether [lba, lba+n) lies within the capacity.
func inRange(lba uint64, n uint64, blocks uint64) bool {
	return lba <= blocks && n <= blocks-lba
}

func (lu *LogicalUnit) writeProtected() bool {
	if lu.readOnly {
		return true
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	return lu.modes.swp
}

// logBackendErr logs a failed backend call; a call cancelled because its
// connection died is expected and logged at debug level.
func (lu *LogicalUnit) logBackendErr(msg, op string, lba uint64, err error) {
	level := slog.LevelError
	if errors.Is(err, context.Canceled) {
		level = slog.LevelDebug
	}
	lu.log.Log(context.Background(), level, msg, "unit", lu.name, "op", op, "lba", lba, "err", err)
}

func (lu *LogicalUnit) readErr(op string, lba uint64, err error) Response {
	lu.logBackendErr("scsi: backend read failed", op, lba, err)
	return lu.checkCondition(senseReadError)
}

func (lu *LogicalUnit) writeErr(op string, lba uint64, err error) Response {
	lu.logBackendErr("scsi: backend write failed", op, lba, err)
	return lu.checkCondition(senseWriteError)
}

// readAt fills p from the backend; a short read is an error.
func (lu *LogicalUnit) readAt(ctx context.Context, p []byte, lba uint64) error {
	n, err := lu.be.ReadAt(ctx, p, int64(lba)<<lu.bsShift)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = fmt.Errorf("short read: %d of %d bytes", n, len(p))
	}
	return err
}

func (lu *LogicalUnit) writeAt(ctx context.Context, p []byte, lba uint64) error {
	n, err := lu.be.WriteAt(ctx, p, int64(lba)<<lu.bsShift)
	if err == nil && n != len(p) {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(p))
	}
	return err
}

func (lu *LogicalUnit) read(ctx context.Context, cdb []byte, blocks uint64) Response {
	lba, n := rwFields(cdb)
	if len(cdb) > 6 && cdb[1]>>5 != 0 { // RDPROTECT: no protection information
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if !inRange(lba, uint64(n), blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if n == 0 {
		return good(nil)
	}
	if n > lu.maxXfer {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	buf := make([]byte, int64(n)<<lu.bsShift)
	h := lu.locks.lock(lba, uint64(n), false)
	err := lu.readAt(ctx, buf, lba)
	lu.locks.unlock(h)
	if err != nil {
		return lu.readErr("read", lba, err)
	}
	return good(buf)
}

func (lu *LogicalUnit) flushFUA(ctx context.Context, cdb []byte, op string, lba uint64) *Response {
	if len(cdb) > 6 && cdb[1]&0x08 != 0 {
		if err := lu.be.Flush(ctx); err != nil {
			r := lu.writeErr(op+" (FUA flush)", lba, err)
			return &r
		}
	}
	return nil
}

func (lu *LogicalUnit) write(ctx context.Context, cdb []byte, data []byte, blocks uint64) Response {
	lba, n := rwFields(cdb)
	if len(cdb) > 6 && cdb[1]>>5 != 0 { // WRPROTECT
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if !inRange(lba, uint64(n), blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if lu.writeProtected() {
		return lu.checkCondition(senseWriteProtected)
	}
	if n == 0 {
		return good(nil)
	}
	if n > lu.maxXfer {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	want := int64(n) << lu.bsShift
	if int64(len(data)) < want {
		// The initiator sent less than the CDB describes: write the
		// whole blocks it did send; the transport reports the overflow.
		data = data[:int64(len(data))>>lu.bsShift<<lu.bsShift]
	} else {
		data = data[:want]
	}
	if len(data) == 0 {
		return good(nil)
	}
	nb := uint64(len(data)) >> lu.bsShift
	h := lu.locks.lock(lba, nb, false)
	err := lu.writeAt(ctx, data, lba)
	lu.locks.unlock(h)
	if err != nil {
		return lu.writeErr("write", lba, err)
	}
	if r := lu.flushFUA(ctx, cdb, "write", lba); r != nil {
		return *r
	}
	return good(nil)
}

// firstMismatch returns the offset of the first differing byte, or -1.
func firstMismatch(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if i >= len(b) || a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

func miscompare(off int) Sense {
	s := senseMiscompare
	s.Info, s.InfoValid = uint64(off), true
	return s
}

func (lu *LogicalUnit) verify(ctx context.Context, cdb []byte, data []byte, blocks uint64) Response {
	lba, n := rwFields(cdb)
	if cdb[1]>>5 != 0 { // VRPROTECT
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	bytchk := (cdb[1] >> 1) & 0x03
	if bytchk == 2 {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if !inRange(lba, uint64(n), blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if n == 0 || bytchk == 0 {
		return good(nil)
	}
	if n > lu.maxXfer {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	medium := make([]byte, int64(n)<<lu.bsShift)
	h := lu.locks.lock(lba, uint64(n), false)
	err := lu.readAt(ctx, medium, lba)
	lu.locks.unlock(h)
	if err != nil {
		return lu.readErr("verify", lba, err)
	}
	if bytchk == 1 {
		if len(data) < len(medium) {
			return lu.checkCondition(senseInvalidFieldInIU)
		}
		if off := firstMismatch(medium, data[:len(medium)]); off >= 0 {
			return lu.checkCondition(miscompare(off))
		}
		return good(nil)
	}
	// BYTCHK 3: one block compared with every block of the range.
	if int64(len(data)) < lu.bs {
		return lu.checkCondition(senseInvalidFieldInIU)
	}
	for i := int64(0); i < int64(len(medium)); i += lu.bs {
		if off := firstMismatch(medium[i:i+lu.bs], data[:lu.bs]); off >= 0 {
			return lu.checkCondition(miscompare(int(i) + off))
		}
	}
	return good(nil)
}

func (lu *LogicalUnit) compareAndWrite(ctx context.Context, cdb []byte, data []byte, blocks uint64) Response {
	lba := binary.BigEndian.Uint64(cdb[2:10])
	n := uint64(cdb[13])
	if cdb[1]>>5 != 0 {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if n > maxCompareAndWriteBlocks {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if !inRange(lba, n, blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if lu.writeProtected() {
		return lu.checkCondition(senseWriteProtected)
	}
	size := int64(n) << lu.bsShift
	if int64(len(data)) != 2*size {
		// The data-out must be exactly the verify and write
		// instances of the blocks the CDB names.
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if n == 0 {
		return good(nil)
	}
	h := lu.locks.lock(lba, n, true)
	defer lu.locks.unlock(h)
	medium := make([]byte, size)
	if err := lu.readAt(ctx, medium, lba); err != nil {
		return lu.readErr("compare and write", lba, err)
	}
	if off := firstMismatch(medium, data[:size]); off >= 0 {
		return lu.checkCondition(miscompare(off))
	}
	if err := lu.writeAt(ctx, data[size:], lba); err != nil {
		return lu.writeErr("compare and write", lba, err)
	}
	if r := lu.flushFUA(ctx, cdb, "compare and write", lba); r != nil {
		return *r
	}
	return good(nil)
}

func (lu *LogicalUnit) orWrite(ctx context.Context, cdb []byte, data []byte, blocks uint64) Response {
	lba, n := rwFields(cdb)
	if cdb[1]>>5 != 0 { // ORPROTECT
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if !inRange(lba, uint64(n), blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if lu.writeProtected() {
		return lu.checkCondition(senseWriteProtected)
	}
	if n == 0 {
		return good(nil)
	}
	if n > lu.maxXfer {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	size := int64(n) << lu.bsShift
	if int64(len(data)) < size {
		return lu.checkCondition(senseInvalidFieldInIU)
	}
	h := lu.locks.lock(lba, uint64(n), true)
	defer lu.locks.unlock(h)
	medium := make([]byte, size)
	if err := lu.readAt(ctx, medium, lba); err != nil {
		return lu.readErr("orwrite", lba, err)
	}
	for i := range medium {
		medium[i] |= data[i]
	}
	if err := lu.writeAt(ctx, medium, lba); err != nil {
		return lu.writeErr("orwrite", lba, err)
	}
	if r := lu.flushFUA(ctx, cdb, "orwrite", lba); r != nil {
		return *r
	}
	return good(nil)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

const writeSameChunk = 1 << 20

func (lu *LogicalUnit) writeSame(ctx context.Context, cdb []byte, data []byte, blocks uint64) Response {
	lba, n := writeSameFields(cdb)
	flags := cdb[1]
	ndob := cdb[0] == opWriteSame16 && flags&0x01 != 0
	unmap := flags&0x08 != 0
	if flags>>5 != 0 || flags&0x10 != 0 || flags&0x06 != 0 { // WRPROTECT, ANCHOR, PBDATA/LBDATA
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	// NUMBER OF LOGICAL BLOCKS: bytes 7-8 of WRITE SAME(10), 10-13 of
	// WRITE SAME(16). Zero is refused (WSNZ), as is more than the
	// MAXIMUM WRITE SAME LENGTH of the block limits page.
	countField := uint16(10)
	if cdb[0] == opWriteSame10 {
		countField = 7
	}
	if n == 0 || n > lu.maxWS {
		return lu.checkCondition(invalidCDBField(countField))
	}
	count := uint64(n)
	if !inRange(lba, count, blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	if lu.writeProtected() {
		return lu.checkCondition(senseWriteProtected)
	}
	pattern := make([]byte, lu.bs)
	if !ndob {
		if int64(len(data)) != lu.bs {
			return lu.checkCondition(senseInvalidFieldInCDB)
		}
		copy(pattern, data)
	}
	h := lu.locks.lock(lba, count, false)
	defer lu.locks.unlock(h)
	if unmap {
		// UNMAP set: deallocate the blocks (they then read as zeros,
		// LBPRZ), whatever the data-out block holds, as Linux LIO and
		// libiscsi's conformance suite expect.
		if err := lu.be.UnmapAt(ctx, int64(lba)<<lu.bsShift, int64(count)<<lu.bsShift); err != nil {
			return lu.writeErr("write same (unmap)", lba, err)
		}
		return good(nil)
	}
	chunkBlocks := uint64(writeSameChunk) >> lu.bsShift
	if count < chunkBlocks {
		chunkBlocks = count
	}
	buf := bytes.Repeat(pattern, int(chunkBlocks))
	for done := uint64(0); done < count; {
		k := min(chunkBlocks, count-done)
		if err := lu.writeAt(ctx, buf[:k<<lu.bsShift], lba+done); err != nil {
			return lu.writeErr("write same", lba+done, err)
		}
		done += k
	}
	return good(nil)
}

func (lu *LogicalUnit) unmap(ctx context.Context, cdb []byte, data []byte, blocks uint64) Response {
	if cdb[1]&0x01 != 0 { // ANCHOR
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	plen := int(binary.BigEndian.Uint16(cdb[7:9]))
	if plen == 0 {
		return good(nil)
	}
	if lu.writeProtected() {
		return lu.checkCondition(senseWriteProtected)
	}
	if plen < 8 || len(data) < plen {
		return lu.checkCondition(senseParamListLength)
	}
	data = data[:plen]
	dlen := int(binary.BigEndian.Uint16(data[0:2]))
	bdlen := int(binary.BigEndian.Uint16(data[2:4]))
	if bdlen%16 != 0 || 8+bdlen > plen || dlen+2 < 6+bdlen && dlen != 0 {
		return lu.checkCondition(senseParamListLength)
	}
	desc := data[8 : 8+bdlen]
	if len(desc)/16 > maxUnmapDescriptors {
		return lu.checkCondition(senseInvalidFieldInParam)
	}
	type extent struct{ lba, n uint64 }
	var extents []extent
	var total uint64
	for i := 0; i+16 <= len(desc); i += 16 {
		lba := binary.BigEndian.Uint64(desc[i : i+8])
		n := uint64(binary.BigEndian.Uint32(desc[i+8 : i+12]))
		// MAXIMUM UNMAP LBA COUNT bounds the whole command.
		if total += n; total > maxUnmapBlocks {
			return lu.checkCondition(senseInvalidFieldInParam)
		}
		if !inRange(lba, n, blocks) {
			return lu.checkCondition(senseLBAOutOfRange)
		}
		if n > 0 {
			extents = append(extents, extent{lba, n})
		}
	}
	for _, e := range extents {
		h := lu.locks.lock(e.lba, e.n, false)
		err := lu.be.UnmapAt(ctx, int64(e.lba)<<lu.bsShift, int64(e.n)<<lu.bsShift)
		lu.locks.unlock(h)
		if err != nil {
			return lu.writeErr("unmap", e.lba, err)
		}
	}
	return good(nil)
}

func (lu *LogicalUnit) syncCache(ctx context.Context, cdb []byte) Response {
	// The range is not checked: some initiators send the LUN size in bytes
	// as the block count, and a flush covers everything anyway.
	if err := lu.be.Flush(ctx); err != nil {
		return lu.writeErr("synchronize cache", 0, err)
	}
	return good(nil)
}

func (lu *LogicalUnit) prefetch(cdb []byte, blocks uint64) Response {
	lba, n := rwFields(cdb)
	if !inRange(lba, uint64(n), blocks) {
		return lu.checkCondition(senseLBAOutOfRange)
	}
	return good(nil)
}
