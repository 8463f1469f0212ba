package scsi

import "encoding/binary"

// opInfo describes one supported command for REPORT SUPPORTED OPERATION
// CODES: its opcode, service action and CDB usage data (the bits of each
// CDB byte the unit evaluates).
type opInfo struct {
	sa    uint16
	hasSA bool
	usage []byte
}

func ff(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = 0xff
	}
	return b
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func b(v ...byte) []byte { return v }

func rw10(op, flags byte) []byte { return cat(b(op, flags), ff(4), b(0), ff(2), b(0)) }
func rw12(op, flags byte) []byte { return cat(b(op, flags), ff(8), b(0, 0)) }
func rw16(op, flags byte) []byte { return cat(b(op, flags), ff(12), b(0, 0)) }

// supportedOps lists every command Execute implements, sorted by opcode and
// service action.
var supportedOps = []opInfo{
	{usage: b(opTestUnitReady, 0, 0, 0, 0, 0)},
	{usage: b(opRequestSense, 0x01, 0, 0, 0xff, 0)},
	{usage: b(opRead6, 0x1f, 0xff, 0xff, 0xff, 0)},
	{usage: b(opWrite6, 0x1f, 0xff, 0xff, 0xff, 0)},
	{usage: b(opInquiry, 0x01, 0xff, 0xff, 0xff, 0)},
	{usage: b(opModeSelect6, 0x11, 0, 0, 0xff, 0)},
	{usage: b(opReserve6, 0, 0, 0, 0, 0)},
	{usage: b(opRelease6, 0, 0, 0, 0, 0)},
	{usage: b(opModeSense6, 0x08, 0xff, 0xff, 0xff, 0)},
	{usage: b(opStartStopUnit, 0x01, 0, 0x0f, 0xf7, 0)},
	{usage: b(opPreventAllow, 0, 0, 0, 0x03, 0)},
	{usage: b(opReadCapacity10, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0)},
	{usage: rw10(opRead10, 0xf8)},
	{usage: rw10(opWrite10, 0xf8)},
	{usage: rw10(opWriteVerify10, 0xf2)},
	{usage: rw10(opVerify10, 0xf6)},
	{usage: rw10(opPrefetch10, 0x02)},
	{usage: rw10(opSyncCache10, 0x02)},
	{usage: rw10(opWriteSame10, 0xf8)},
	{usage: b(opUnmap, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, 0)},
	{usage: b(opModeSelect10, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0)},
	{usage: b(opReserve10, 0, 0, 0, 0, 0, 0, 0, 0, 0)},
	{usage: b(opRelease10, 0, 0, 0, 0, 0, 0, 0, 0, 0)},
	{usage: b(opModeSense10, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0)},
	{sa: 0x00, hasSA: true, usage: b(opPersistReserveIn, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0)},
	{sa: 0x01, hasSA: true, usage: b(opPersistReserveIn, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0)},
	{sa: 0x02, hasSA: true, usage: b(opPersistReserveIn, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0)},
	{sa: 0x03, hasSA: true, usage: b(opPersistReserveIn, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0)},
	{sa: 0x00, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{sa: 0x01, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{sa: 0x02, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{sa: 0x03, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{sa: 0x04, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{sa: 0x05, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{sa: 0x06, hasSA: true, usage: b(opPersistReserveOut, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0)},
	{usage: rw16(opRead16, 0xf8)},
	{usage: cat(b(opCompareAndWrite, 0xf8), ff(8), b(0, 0, 0, 0xff, 0, 0))},
	{usage: rw16(opWrite16, 0xf8)},
	{usage: rw16(opOrWrite16, 0xf8)},
	{usage: rw16(opWriteVerify16, 0xf2)},
	{usage: rw16(opVerify16, 0xf6)},
	{usage: rw16(opPrefetch16, 0x02)},
	{usage: rw16(opSyncCache16, 0x02)},
	{usage: rw16(opWriteSame16, 0xf9)},
	{sa: saReadCapacity16, hasSA: true, usage: cat(b(opServiceActionIn16, 0x1f), make([]byte, 8), ff(4), b(0, 0))},
	{sa: saGetLBAStatus, hasSA: true, usage: cat(b(opServiceActionIn16, 0x1f), ff(12), b(0, 0))},
	{usage: cat(b(opReportLUNs, 0, 0xff, 0, 0, 0), ff(4), b(0, 0))},
	{sa: saReportOpcodes, hasSA: true, usage: cat(b(opMaintenanceIn, 0x1f, 0x87), ff(7), b(0, 0))},
	{usage: rw12(opRead12, 0xf8)},
	{usage: rw12(opWrite12, 0xf8)},
	{usage: rw12(opWriteVerify12, 0xf2)},
	{usage: rw12(opVerify12, 0xf6)},
}

// timeoutDescriptor is the 12-byte command timeouts descriptor: no
// command-specific timeouts are advertised (zero means unspecified).
func timeoutDescriptor() []byte {
	d := make([]byte, 12)
	binary.BigEndian.PutUint16(d[0:2], 0x0a)
	return d
}

func (lu *LogicalUnit) reportSupportedOpcodes(cdb []byte) Response {
	rctd := cdb[2]&0x80 != 0
	options := cdb[2] & 0x07
	reqOp := cdb[3]
	reqSA := binary.BigEndian.Uint16(cdb[4:6])
	alloc := int(binary.BigEndian.Uint32(cdb[6:10]))
	switch options {
	case 0:
		out := make([]byte, 4)
		for _, o := range supportedOps {
			d := make([]byte, 8)
			d[0] = o.usage[0]
			binary.BigEndian.PutUint16(d[2:4], o.sa)
			if o.hasSA {
				d[5] |= 0x01
			}
			if rctd {
				d[5] |= 0x02
			}
			binary.BigEndian.PutUint16(d[6:8], uint16(len(o.usage)))
			out = append(out, d...)
			if rctd {
				out = append(out, timeoutDescriptor()...)
			}
		}
		binary.BigEndian.PutUint32(out[0:4], uint32(len(out)-4))
		return allocate(out, alloc)
	case 1, 2, 3:
		opHasSA := false
		var found *opInfo
		for i := range supportedOps {
			o := &supportedOps[i]
			if o.usage[0] != reqOp {
				continue
			}
			opHasSA = o.hasSA
			if !o.hasSA || o.sa == reqSA {
				found = o
			}
		}
		if options == 1 && opHasSA || options == 2 && found != nil && !opHasSA {
			return lu.checkCondition(senseInvalidFieldInCDB)
		}
		out := make([]byte, 4)
		if found == nil {
			out[1] = 0x01 // not supported
			return allocate(out, alloc)
		}
		out[1] = 0x03 // supported in conformance with a standard
		if rctd {
			out[1] |= 0x80
		}
		binary.BigEndian.PutUint16(out[2:4], uint16(len(found.usage)))
		out = append(out, found.usage...)
		if rctd {
			out = append(out, timeoutDescriptor()...)
		}
		return allocate(out, alloc)
	}
	return lu.checkCondition(senseInvalidFieldInCDB)
}
