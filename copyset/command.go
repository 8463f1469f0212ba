package copyset

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Operations a copyset's log carries.
const (
	opWrite  byte = 1
	opDelete byte = 2
	// opTrim drops what no live snapshot of the chunk's volume reads any
	// more of the chunk's versions; its data is the trim's bound and live
	// list (encodeTrim).
	opTrim byte = 3
	// opHasRequest, or-ed into the op, says a client request (client, seq,
	// low: 24 bytes) follows the fixed fields, before the data.
	opHasRequest byte = 0x80
	// opHasSeq, or-ed into the op, says the write's sequence numbers (sn,
	// keep: 16 bytes) follow the fixed fields and the request, before the
	// data.
	opHasSeq byte = 0x40
	// opClone, or-ed into a write, says it is a clone's write: the fill's
	// offset and length (12 bytes) follow the sequence numbers, and the
	// data is the fill, then the write's data (ChunkStore.WriteClone).
	// Or-ed into a delete, it zeroes a clone's chunk instead
	// (ChunkStore.ZeroSN).
	opClone byte = 0x20
	opFlags      = opHasRequest | opHasSeq | opClone
)

// commandHeaderSize is op u8 + proposer u64 + proposal id u64.
const commandHeaderSize = 17

// Seq is what a write carries for snapshots: the volume's sequence number
// and the newest live snapshot's (0: none). A zero Seq is a write outside
// snapshots.
type Seq struct {
	SN, Keep uint64
}

// command is one state-machine operation as it travels in a Raft entry:
//
//	op u8 | proposer u64 | id u64 | chunk u64 | volume u64 | epoch u64 | offset u64 |
//	[client u64 | seq u64 | low u64, when op has opHasRequest] |
//	[sn u64 | keep u64, when op has opHasSeq] |
//	[fill offset u64 | fill length u32, when a write has opClone] | [fill] | data...
//
// proposer and id let the replica that proposed the entry match it with its
// waiting caller when it is applied; other replicas ignore them. The client
// request lets every replica skip a request applied before (dedup.go).
type command struct {
	op       byte
	proposer uint64
	id       uint64
	chunk    uint64
	volume   uint64
	epoch    uint64
	offset   uint64
	req      ClientRequest
	seq      Seq
	clone    bool
	fillOff  uint64
	fill     []byte
	data     []byte
}

const commandFixedSize = commandHeaderSize + 32

var errBadCommand = errors.New("copyset: malformed command")

// requestSize is the size of the client request fields; seqSize of the
// sequence numbers.
const (
	requestSize = 24
	seqSize     = 16
	fillSize    = 12
)

func (c *command) encode() []byte {
	size := commandFixedSize
	op := c.op
	if c.req.Client != 0 {
		size += requestSize
		op |= opHasRequest
	}
	if c.seq != (Seq{}) {
		size += seqSize
		op |= opHasSeq
	}
	if c.clone {
		op |= opClone
		if c.op == opWrite {
			size += fillSize
		}
	}
	buf := make([]byte, size, size+len(c.fill)+len(c.data))
	buf[0] = op
	binary.LittleEndian.PutUint64(buf[1:], c.proposer)
	binary.LittleEndian.PutUint64(buf[9:], c.id)
	binary.LittleEndian.PutUint64(buf[17:], c.chunk)
	binary.LittleEndian.PutUint64(buf[25:], c.volume)
	binary.LittleEndian.PutUint64(buf[33:], c.epoch)
	binary.LittleEndian.PutUint64(buf[41:], c.offset)
	at := commandFixedSize
	if c.req.Client != 0 {
		binary.LittleEndian.PutUint64(buf[at:], c.req.Client)
		binary.LittleEndian.PutUint64(buf[at+8:], c.req.Seq)
		binary.LittleEndian.PutUint64(buf[at+16:], c.req.Low)
		at += requestSize
	}
	if c.seq != (Seq{}) {
		binary.LittleEndian.PutUint64(buf[at:], c.seq.SN)
		binary.LittleEndian.PutUint64(buf[at+8:], c.seq.Keep)
		at += seqSize
	}
	if c.clone && c.op == opWrite {
		binary.LittleEndian.PutUint64(buf[at:], c.fillOff)
		binary.LittleEndian.PutUint32(buf[at+8:], uint32(len(c.fill)))
		buf = append(buf, c.fill...)
	}
	return append(buf, c.data...)
}

// decodeCommand decodes an entry's data. The returned data aliases b.
func decodeCommand(b []byte) (command, error) {
	if len(b) < commandFixedSize {
		return command{}, fmt.Errorf("%w: %d bytes", errBadCommand, len(b))
	}
	c := command{
		op:       b[0] &^ opFlags,
		proposer: binary.LittleEndian.Uint64(b[1:]),
		id:       binary.LittleEndian.Uint64(b[9:]),
		chunk:    binary.LittleEndian.Uint64(b[17:]),
		volume:   binary.LittleEndian.Uint64(b[25:]),
		epoch:    binary.LittleEndian.Uint64(b[33:]),
		offset:   binary.LittleEndian.Uint64(b[41:]),
	}
	at := commandFixedSize
	if b[0]&opHasRequest != 0 {
		if len(b) < at+requestSize {
			return command{}, fmt.Errorf("%w: %d bytes with a client request", errBadCommand, len(b))
		}
		c.req = ClientRequest{
			Client: binary.LittleEndian.Uint64(b[at:]),
			Seq:    binary.LittleEndian.Uint64(b[at+8:]),
			Low:    binary.LittleEndian.Uint64(b[at+16:]),
		}
		at += requestSize
	}
	if b[0]&opHasSeq != 0 {
		if len(b) < at+seqSize {
			return command{}, fmt.Errorf("%w: %d bytes with sequence numbers", errBadCommand, len(b))
		}
		c.seq = Seq{SN: binary.LittleEndian.Uint64(b[at:]), Keep: binary.LittleEndian.Uint64(b[at+8:])}
		at += seqSize
	}
	c.clone = b[0]&opClone != 0
	if c.clone && c.op == opWrite {
		if len(b) < at+fillSize {
			return command{}, fmt.Errorf("%w: %d bytes with a fill", errBadCommand, len(b))
		}
		c.fillOff = binary.LittleEndian.Uint64(b[at:])
		n := int(binary.LittleEndian.Uint32(b[at+8:]))
		at += fillSize
		if len(b) < at+n {
			return command{}, fmt.Errorf("%w: %d bytes with a fill of %d", errBadCommand, len(b), n)
		}
		c.fill = b[at : at+n]
		at += n
	}
	c.data = b[at:]
	switch c.op {
	case opWrite, opDelete:
	case opTrim:
		if c.clone {
			return command{}, fmt.Errorf("%w: a clone's trim", errBadCommand)
		}
		if _, _, err := decodeTrim(c.data); err != nil {
			return command{}, err
		}
	default:
		return command{}, fmt.Errorf("%w: op %d", errBadCommand, b[0])
	}
	return c, nil
}

// maxTrimLive bounds the live snapshots a trim lists.
const maxTrimLive = 4096

// encodeTrim is a trim's data: bound u64 | count u32 | live u64 * count.
func encodeTrim(live []uint64, bound uint64) []byte {
	b := make([]byte, 12+8*len(live))
	binary.LittleEndian.PutUint64(b, bound)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(live)))
	for i, s := range live {
		binary.LittleEndian.PutUint64(b[12+8*i:], s)
	}
	return b
}

func decodeTrim(b []byte) (live []uint64, bound uint64, err error) {
	if len(b) < 12 {
		return nil, 0, fmt.Errorf("%w: trim of %d bytes", errBadCommand, len(b))
	}
	bound = binary.LittleEndian.Uint64(b)
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxTrimLive || len(b) != 12+8*int(n) {
		return nil, 0, fmt.Errorf("%w: trim of %d bytes lists %d snapshots", errBadCommand, len(b), n)
	}
	live = make([]uint64, n)
	for i := range live {
		live[i] = binary.LittleEndian.Uint64(b[12+8*i:])
	}
	return live, bound, nil
}

// proposalKey reads the proposer and id of an encoded command without
// decoding the rest.
func proposalKey(b []byte) (proposer, id uint64, ok bool) {
	if len(b) < commandHeaderSize {
		return 0, 0, false
	}
	return binary.LittleEndian.Uint64(b[1:]), binary.LittleEndian.Uint64(b[9:]), true
}
