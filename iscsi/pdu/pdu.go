package pdu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
)

// BHSLen is the length of the basic header segment.
const BHSLen = 48

// Opcode is the operation code in byte 0 of the basic header segment.
type Opcode uint8

// Initiator and target opcodes (RFC 7143 section 11.1.1).
const (
	OpNopOut               Opcode = 0x00
	OpSCSICommand          Opcode = 0x01
	OpTaskMgmtReq          Opcode = 0x02
	OpLoginReq             Opcode = 0x03
	OpTextReq              Opcode = 0x04
	OpDataOut              Opcode = 0x05
	OpLogoutReq            Opcode = 0x06
	OpSNACKReq             Opcode = 0x10
	OpNopIn                Opcode = 0x20
	OpSCSIResponse         Opcode = 0x21
	OpTaskMgmtResp         Opcode = 0x22
	OpLoginResp            Opcode = 0x23
	OpTextResp             Opcode = 0x24
	OpDataIn               Opcode = 0x25
	OpLogoutResp           Opcode = 0x26
	OpR2T                  Opcode = 0x31
	OpAsyncMessage         Opcode = 0x32
	OpReject               Opcode = 0x3f
	opcodeMask                    = 0x3f
	immediateBit                  = 0x40
	finalBit                      = 0x80
	defaultMaxDataSegment         = 8192
	maxAHSLenWords                = 255
	dataSegmentLengthLimit        = 1<<24 - 1
)

var opcodeNames = map[Opcode]string{
	OpNopOut: "NOP-Out", OpSCSICommand: "SCSI Command", OpTaskMgmtReq: "Task Management Request",
	OpLoginReq: "Login Request", OpTextReq: "Text Request", OpDataOut: "Data-Out",
	OpLogoutReq: "Logout Request", OpSNACKReq: "SNACK Request", OpNopIn: "NOP-In",
	OpSCSIResponse: "SCSI Response", OpTaskMgmtResp: "Task Management Response",
	OpLoginResp: "Login Response", OpTextResp: "Text Response", OpDataIn: "Data-In",
	OpLogoutResp: "Logout Response", OpR2T: "R2T", OpAsyncMessage: "Asynchronous Message",
	OpReject: "Reject",
}

// String names the opcode as RFC 7143 does.
func (o Opcode) String() string {
	if n, ok := opcodeNames[o]; ok {
		return n
	}
	return fmt.Sprintf("opcode 0x%02x", uint8(o))
}

// Errors returned by Reader.
var (
	// ErrHeaderDigest is returned when the header digest does not match; the
	// connection can no longer be trusted to be in step and must be closed.
	ErrHeaderDigest = errors.New("pdu: header digest mismatch")
	// ErrDataDigest is returned when the data digest does not match. The
	// header was read correctly and the whole PDU was consumed, so the
	// connection is still in step; the caller rejects the PDU.
	ErrDataDigest = errors.New("pdu: data digest mismatch")
	// ErrDataTooLong is returned when the data segment is longer than the
	// negotiated MaxRecvDataSegmentLength. The data was not consumed.
	ErrDataTooLong = errors.New("pdu: data segment longer than negotiated")
	// ErrMalformed is returned for a header that cannot be a valid PDU.
	ErrMalformed = errors.New("pdu: malformed header")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// CRC32C returns the iSCSI digest of the concatenation of bufs.
func CRC32C(bufs ...[]byte) uint32 {
	var c uint32
	for _, b := range bufs {
		c = crc32.Update(c, castagnoli, b)
	}
	return c
}

// BHS is the 48-byte basic header segment. Field accessors follow the
// common layout of RFC 7143 section 11.2; opcode-specific fields are read
// with U16/U32 at the offsets the RFC gives.
type BHS [BHSLen]byte

// Opcode returns the operation code.
func (b *BHS) Opcode() Opcode { return Opcode(b[0] & opcodeMask) }

// SetOpcode sets the operation code and clears the immediate bit.
func (b *BHS) SetOpcode(o Opcode) { b[0] = byte(o) & opcodeMask }

// Immediate reports the I bit of a request.
func (b *BHS) Immediate() bool { return b[0]&immediateBit != 0 }

// Flags returns byte 1 (F bit and opcode-specific flags).
func (b *BHS) Flags() byte { return b[1] }

// Final reports the F bit.
func (b *BHS) Final() bool { return b[1]&finalBit != 0 }

// TotalAHSLength returns the length of the additional header segments in
// 4-byte words.
func (b *BHS) TotalAHSLength() int { return int(b[4]) }

// DataSegmentLength returns the length of the data segment without padding.
func (b *BHS) DataSegmentLength() int {
	return int(b[5])<<16 | int(b[6])<<8 | int(b[7])
}

// SetDataSegmentLength sets bytes 5-7.
func (b *BHS) SetDataSegmentLength(n int) {
	b[5], b[6], b[7] = byte(n>>16), byte(n>>8), byte(n)
}

// LUN returns bytes 8-15.
func (b *BHS) LUN() uint64 { return binary.BigEndian.Uint64(b[8:16]) }

// SetLUN sets bytes 8-15.
func (b *BHS) SetLUN(l uint64) { binary.BigEndian.PutUint64(b[8:16], l) }

// ITT returns the initiator task tag (bytes 16-19).
func (b *BHS) ITT() uint32 { return b.U32(16) }

// SetITT sets the initiator task tag.
func (b *BHS) SetITT(v uint32) { b.SetU32(16, v) }

// U16 returns the big-endian 16-bit field at off.
func (b *BHS) U16(off int) uint16 { return binary.BigEndian.Uint16(b[off : off+2]) }

// SetU16 sets the big-endian 16-bit field at off.
func (b *BHS) SetU16(off int, v uint16) { binary.BigEndian.PutUint16(b[off:off+2], v) }

// U32 returns the big-endian 32-bit field at off.
func (b *BHS) U32(off int) uint32 { return binary.BigEndian.Uint32(b[off : off+4]) }

// SetU32 sets the big-endian 32-bit field at off.
func (b *BHS) SetU32(off int, v uint32) { binary.BigEndian.PutUint32(b[off:off+4], v) }

// Offsets of fields shared by several opcodes.
const (
	OffITT        = 16 // initiator task tag
	OffTTT        = 20 // target transfer tag (NOP, Data, R2T, Text, Login CID at 20 as 16 bits)
	OffEDTL       = 20 // expected data transfer length (SCSI Command)
	OffCmdSN      = 24 // CmdSN in requests
	OffStatSN     = 24 // StatSN in responses
	OffExpStatSN  = 28 // ExpStatSN in requests
	OffExpCmdSN   = 28 // ExpCmdSN in responses
	OffMaxCmdSN   = 32 // MaxCmdSN in responses
	OffDataSN     = 36 // DataSN / R2TSN / ExpDataSN
	OffBufferOff  = 40 // buffer offset in Data-In/Out and R2T
	OffDesiredLen = 44 // desired data transfer length in R2T
	OffResidual   = 44 // residual count in Data-In and SCSI Response
	OffBidiResid  = 40 // bidirectional read residual count in SCSI Response
	OffCDB        = 32 // CDB in SCSI Command (16 bytes)
	OffRefTaskTag = 20 // referenced task tag in Task Management Request
	OffRefCmdSN   = 32 // RefCmdSN in Task Management Request
	OffExpDataSN  = 36 // ExpDataSN in Task Management Request
)

// PDU is one protocol data unit: header, additional header segments and
// data segment (without padding and digests).
type PDU struct {
	BHS  BHS
	AHS  []byte
	Data []byte
}

// Reader reads PDUs from a connection. Digests and the data segment limit
// change during login, so they are fields the connection sets as the
// negotiation takes effect.
type Reader struct {
	R io.Reader
	// HeaderDigest and DataDigest enable CRC32C checking.
	HeaderDigest, DataDigest bool
	// MaxData is the largest data segment accepted; 0 means the RFC default
	// of 8192 bytes.
	MaxData int
	hdr     [BHSLen + maxAHSLenWords*4 + 4]byte
}

// ReadHeader reads the basic header, any additional header segments and
// the header digest. The data segment, if any, must be read next with
// ReadData or Discard.
func (r *Reader) ReadHeader(p *PDU) error {
	if _, err := io.ReadFull(r.R, r.hdr[:BHSLen]); err != nil {
		return err
	}
	copy(p.BHS[:], r.hdr[:BHSLen])
	n := BHSLen
	ahs := p.BHS.TotalAHSLength() * 4
	if ahs > 0 {
		if _, err := io.ReadFull(r.R, r.hdr[n:n+ahs]); err != nil {
			return unexpectedEOF(err)
		}
		n += ahs
		p.AHS = append(p.AHS[:0], r.hdr[BHSLen:n]...)
	} else {
		p.AHS = p.AHS[:0]
	}
	if r.HeaderDigest {
		if _, err := io.ReadFull(r.R, r.hdr[n:n+4]); err != nil {
			return unexpectedEOF(err)
		}
		if binary.LittleEndian.Uint32(r.hdr[n:n+4]) != CRC32C(r.hdr[:n]) {
			return ErrHeaderDigest
		}
	}
	max := r.MaxData
	if max <= 0 {
		max = defaultMaxDataSegment
	}
	if p.BHS.DataSegmentLength() > max {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrDataTooLong, p.BHS.DataSegmentLength(), max)
	}
	return nil
}

// ReadData reads the data segment announced by the last header into dst,
// which must be exactly DataSegmentLength bytes long, and consumes padding
// and data digest.
func (r *Reader) ReadData(dst []byte) error {
	if _, err := io.ReadFull(r.R, dst); err != nil {
		return unexpectedEOF(err)
	}
	var tail [7]byte
	pad := padLen(len(dst))
	tl := pad
	if r.DataDigest && len(dst) > 0 {
		tl += 4
	}
	if tl == 0 {
		return nil
	}
	if _, err := io.ReadFull(r.R, tail[:tl]); err != nil {
		return unexpectedEOF(err)
	}
	if r.DataDigest && len(dst) > 0 {
		if binary.LittleEndian.Uint32(tail[pad:pad+4]) != CRC32C(dst, tail[:pad]) {
			return ErrDataDigest
		}
	}
	return nil
}

// Discard reads and drops a data segment of n bytes with its padding and
// digest (used for data of a task that no longer exists).
func (r *Reader) Discard(n int) error {
	tl := int64(n + padLen(n))
	if r.DataDigest && n > 0 {
		tl += 4
	}
	if _, err := io.CopyN(io.Discard, r.R, tl); err != nil {
		return unexpectedEOF(err)
	}
	return nil
}

// Read reads one complete PDU, allocating its data segment.
func (r *Reader) Read(p *PDU) error {
	if err := r.ReadHeader(p); err != nil {
		return err
	}
	p.Data = make([]byte, p.BHS.DataSegmentLength())
	return r.ReadData(p.Data)
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

func padLen(n int) int { return (4 - n%4) % 4 }

var zeroPad [4]byte

// Write sends p to w as one gathered write, with padding and digests as
// requested. The BHS data segment length and AHS length are set from p.
func Write(w io.Writer, p *PDU, headerDigest, dataDigest bool) error {
	if len(p.AHS)%4 != 0 || len(p.AHS) > maxAHSLenWords*4 {
		return fmt.Errorf("%w: AHS of %d bytes", ErrMalformed, len(p.AHS))
	}
	if len(p.Data) > dataSegmentLengthLimit {
		return fmt.Errorf("%w: data segment of %d bytes", ErrDataTooLong, len(p.Data))
	}
	p.BHS[4] = byte(len(p.AHS) / 4)
	p.BHS.SetDataSegmentLength(len(p.Data))
	var hd, dd [4]byte
	bufs := make(net.Buffers, 0, 6)
	bufs = append(bufs, p.BHS[:])
	if len(p.AHS) > 0 {
		bufs = append(bufs, p.AHS)
	}
	if headerDigest {
		binary.LittleEndian.PutUint32(hd[:], CRC32C(p.BHS[:], p.AHS))
		bufs = append(bufs, hd[:])
	}
	if len(p.Data) > 0 {
		pad := zeroPad[:padLen(len(p.Data))]
		bufs = append(bufs, p.Data)
		if len(pad) > 0 {
			bufs = append(bufs, pad)
		}
		if dataDigest {
			binary.LittleEndian.PutUint32(dd[:], CRC32C(p.Data, pad))
			bufs = append(bufs, dd[:])
		}
	}
	_, err := bufs.WriteTo(w)
	return err
}
