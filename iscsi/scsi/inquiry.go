package scsi

import (
	"encoding/binary"
)

// Version descriptors reported in standard INQUIRY data.
var versionDescriptors = []uint16{
	0x00a0, // SAM-5
	0x0960, // iSCSI
	0x0460, // SPC-4
	0x04c0, // SBC-3
}

// Supported VPD pages, sorted.
var vpdPages = []byte{0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2}

func (lu *LogicalUnit) inquiry(cdb []byte) Response {
	evpd := cdb[1]&0x01 != 0
	page := cdb[2]
	alloc := int(binary.BigEndian.Uint16(cdb[3:5]))
	if cdb[1]&0x02 != 0 { // CMDDT (obsolete)
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if !evpd {
		if page != 0 {
			return lu.checkCondition(senseInvalidFieldInCDB)
		}
		return allocate(lu.standardInquiry(0x00), alloc)
	}
	var body []byte
	switch page {
	case 0x00:
		body = vpdPages
	case 0x80:
		body = []byte(lu.serial)
	case 0x83:
		body = lu.deviceIdentification()
	case 0xb0:
		body = lu.blockLimits()
	case 0xb1:
		body = make([]byte, 0x3c)
		binary.BigEndian.PutUint16(body[0:2], 1) // non-rotating medium
	case 0xb2:
		body = make([]byte, 4)
		// LBPU, LBPWS, LBPWS10, LBPRZ=1.
		body[1] = 0x80 | 0x40 | 0x20 | 0x04
		body[2] = 0x02 // thin provisioned
	default:
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	out := make([]byte, 4+len(body))
	out[1] = page
	binary.BigEndian.PutUint16(out[2:4], uint16(len(body)))
	copy(out[4:], body)
	return allocate(out, alloc)
}

// standardInquiry builds the 96-byte standard INQUIRY data with the given
// peripheral qualifier/device type byte.
func (lu *LogicalUnit) standardInquiry(pq byte) []byte {
	b := make([]byte, 96)
	b[0] = pq
	b[2] = 0x06        // SPC-4
	b[3] = 0x10 | 0x02 // HISUP, response data format 2
	b[4] = byte(len(b) - 5)
	b[7] = 0x02 // CMDQUE
	copy(b[8:16], lu.vendor)
	copy(b[16:32], lu.product)
	copy(b[32:36], lu.revision)
	for i, v := range versionDescriptors {
		binary.BigEndian.PutUint16(b[58+2*i:], v)
	}
	return b
}

// inquiryNoLUN answers INQUIRY for a LUN that does not exist: peripheral
// qualifier 011b, device type 1Fh.
func (lu *LogicalUnit) inquiryNoLUN(cdb []byte) Response {
	alloc := int(binary.BigEndian.Uint16(cdb[3:5]))
	if cdb[1]&0x01 != 0 || cdb[2] != 0 {
		return lu.checkCondition(senseLUNotSupported)
	}
	return allocate(lu.standardInquiry(0x7f), alloc)
}

func designator(codeSet, assocType byte, value []byte) []byte {
	d := make([]byte, 4+len(value))
	d[0] = codeSet
	d[1] = assocType
	d[3] = byte(len(value))
	copy(d[4:], value)
	return d
}

func (lu *LogicalUnit) deviceIdentification() []byte {
	var out []byte
	// NAA (type 3), binary, logical unit association.
	naa := make([]byte, 8)
	binary.BigEndian.PutUint64(naa, lu.naa)
	out = append(out, designator(0x01, 0x03, naa)...)
	// T10 vendor ID based (type 1), ASCII: vendor + serial.
	t10 := append([]byte(lu.vendor), lu.serial...)
	out = append(out, designator(0x02, 0x01, t10)...)
	// Relative target port (type 4), target port association.
	rtp := []byte{0, 0, 0, 1}
	out = append(out, designator(0x51, 0x94, rtp)...)
	return out
}

func (lu *LogicalUnit) blockLimits() []byte {
	b := make([]byte, 0x3c)
	// Offsets below are relative to byte 4 of the page.
	b[0] = 0x01 // WSNZ: WRITE SAME of zero blocks is refused
	b[1] = maxCompareAndWriteBlocks
	phys := uint16(1) << lu.physExp
	binary.BigEndian.PutUint16(b[2:4], phys) // optimal transfer length granularity
	binary.BigEndian.PutUint32(b[4:8], lu.maxXfer)
	binary.BigEndian.PutUint32(b[8:12], min(optimalTransferBlocks, lu.maxXfer))
	binary.BigEndian.PutUint32(b[16:20], maxUnmapBlocks)
	binary.BigEndian.PutUint32(b[20:24], maxUnmapDescriptors)
	binary.BigEndian.PutUint32(b[24:28], uint32(phys))     // optimal unmap granularity
	binary.BigEndian.PutUint32(b[28:32], 0x80000000)       // UGAVALID, alignment 0
	binary.BigEndian.PutUint64(b[32:40], uint64(lu.maxWS)) // MAXIMUM WRITE SAME LENGTH
	return b
}

func (lu *LogicalUnit) reportLUNs(cdb []byte) Response {
	alloc := int(binary.BigEndian.Uint32(cdb[6:10]))
	if alloc < 16 {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	switch cdb[2] {
	case 0x00, 0x02:
		out := make([]byte, 16)
		binary.BigEndian.PutUint32(out[0:4], 8)
		return allocate(out, alloc)
	case 0x01, 0x10, 0x11, 0x12:
		// No well-known or administrative logical units.
		return allocate(make([]byte, 8), alloc)
	}
	return lu.checkCondition(senseInvalidFieldInCDB)
}

func (lu *LogicalUnit) readCapacity10(cdb []byte, blocks uint64) Response {
	pmi := cdb[8]&0x01 != 0
	if !pmi && binary.BigEndian.Uint32(cdb[2:6]) != 0 {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	out := make([]byte, 8)
	last := uint64(0xffffffff)
	if blocks > 0 && blocks-1 < last {
		last = blocks - 1
	}
	if blocks == 0 {
		last = 0
	}
	binary.BigEndian.PutUint32(out[0:4], uint32(last))
	binary.BigEndian.PutUint32(out[4:8], uint32(lu.bs))
	return good(out)
}

func (lu *LogicalUnit) readCapacity16(cdb []byte, blocks uint64) Response {
	alloc := int(binary.BigEndian.Uint32(cdb[10:14]))
	out := make([]byte, 32)
	if blocks > 0 {
		binary.BigEndian.PutUint64(out[0:8], blocks-1)
	}
	binary.BigEndian.PutUint32(out[8:12], uint32(lu.bs))
	out[13] = lu.physExp & 0x0f
	out[14] = 0x80 | 0x40 // LBPME, LBPRZ
	return allocate(out, alloc)
}
