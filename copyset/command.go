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
	// opHasRequest, or-ed into the op, says a client request (client, seq,
	// low: 24 bytes) follows the fixed fields, before the data.
	opHasRequest byte = 0x80
)

// commandHeaderSize is op u8 + proposer u64 + proposal id u64.
const commandHeaderSize = 17

// command is one state-machine operation as it travels in a Raft entry:
//
//	op u8 | proposer u64 | id u64 | chunk u64 | volume u64 | epoch u64 | offset u64 |
//	[client u64 | seq u64 | low u64, when op has opHasRequest] | data...
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
	data     []byte
}

const commandFixedSize = commandHeaderSize + 32

var errBadCommand = errors.New("copyset: malformed command")

// requestSize is the size of the client request fields.
const requestSize = 24

func (c *command) encode() []byte {
	size := commandFixedSize
	if c.req.Client != 0 {
		size += requestSize
	}
	buf := make([]byte, size, size+len(c.data))
	buf[0] = c.op
	if c.req.Client != 0 {
		buf[0] |= opHasRequest
		binary.LittleEndian.PutUint64(buf[49:], c.req.Client)
		binary.LittleEndian.PutUint64(buf[57:], c.req.Seq)
		binary.LittleEndian.PutUint64(buf[65:], c.req.Low)
	}
	binary.LittleEndian.PutUint64(buf[1:], c.proposer)
	binary.LittleEndian.PutUint64(buf[9:], c.id)
	binary.LittleEndian.PutUint64(buf[17:], c.chunk)
	binary.LittleEndian.PutUint64(buf[25:], c.volume)
	binary.LittleEndian.PutUint64(buf[33:], c.epoch)
	binary.LittleEndian.PutUint64(buf[41:], c.offset)
	return append(buf, c.data...)
}

// decodeCommand decodes an entry's data. The returned data aliases b.
func decodeCommand(b []byte) (command, error) {
	if len(b) < commandFixedSize {
		return command{}, fmt.Errorf("%w: %d bytes", errBadCommand, len(b))
	}
	c := command{
		op:       b[0] &^ opHasRequest,
		proposer: binary.LittleEndian.Uint64(b[1:]),
		id:       binary.LittleEndian.Uint64(b[9:]),
		chunk:    binary.LittleEndian.Uint64(b[17:]),
		volume:   binary.LittleEndian.Uint64(b[25:]),
		epoch:    binary.LittleEndian.Uint64(b[33:]),
		offset:   binary.LittleEndian.Uint64(b[41:]),
		data:     b[commandFixedSize:],
	}
	if b[0]&opHasRequest != 0 {
		if len(b) < commandFixedSize+requestSize {
			return command{}, fmt.Errorf("%w: %d bytes with a client request", errBadCommand, len(b))
		}
		c.req = ClientRequest{
			Client: binary.LittleEndian.Uint64(b[49:]),
			Seq:    binary.LittleEndian.Uint64(b[57:]),
			Low:    binary.LittleEndian.Uint64(b[65:]),
		}
		c.data = b[commandFixedSize+requestSize:]
	}
	if c.op != opWrite && c.op != opDelete {
		return command{}, fmt.Errorf("%w: op %d", errBadCommand, b[0])
	}
	return c, nil
}

// proposalKey reads the proposer and id of an encoded command without
// decoding the rest.
func proposalKey(b []byte) (proposer, id uint64, ok bool) {
	if len(b) < commandHeaderSize {
		return 0, 0, false
	}
	return binary.LittleEndian.Uint64(b[1:]), binary.LittleEndian.Uint64(b[9:]), true
}
