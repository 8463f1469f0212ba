package nbd

import (
	"encoding/binary"
	"fmt"
)

// request is one transmission request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// parseRequestHeader decodes the 28-byte request header. Only a wrong size or magic is an error;
// whether the request makes sense for the export is decided by exportLimits.check.
func parseRequestHeader(b []byte) (request, error) {
	if len(b) != requestHdrSize {
		return request{}, fmt.Errorf("request header of %d bytes", len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return request{}, fmt.Errorf("request magic %#x: %w", m, errBadMagic)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		cookie: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// hasPayload reports whether the request header is followed by length bytes of data.
func (r request) hasPayload() bool { return r.typ == cmdWrite }

// exportLimits is what the server told the client in the handshake: the export's size, the
// block size constraints and which features the transmission flags expose.
type exportLimits struct {
	size        uint64
	minBlock    uint32
	maxPayload  uint32
	structured  bool // structured replies negotiated; NBD_FLAG_SEND_DF is advertised with them
	blockStatus bool // base:allocation negotiated for this export: NBD_CMD_BLOCK_STATUS allowed
}

// rejection is why a request is refused before it reaches the backend: a protocol error value and
// a message for a human (sent in a structured error chunk and logged).
type rejection struct {
	errno uint32
	msg   string
}

// check validates a request against the export: known command, flags documented for it,
// alignment, payload limit and bounds. It returns nil when the request may run.
// NBD_CMD_DISC is not checked: it ends the connection whatever it carries.
func (l exportLimits) check(r request) *rejection {
	allowed := cmdFlagFUA // valid on every command once NBD_FLAG_SEND_FUA is advertised
	switch r.typ {
	case cmdRead:
		if l.structured {
			allowed |= cmdFlagDF
		}
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
	case cmdBlockStatus:
		if !l.blockStatus {
			return &rejection{errnoInval, "NBD_CMD_BLOCK_STATUS without the base:allocation metadata context"}
		}
		if r.length == 0 {
			return &rejection{errnoInval, "NBD_CMD_BLOCK_STATUS of 0 bytes"}
		}
		allowed |= cmdFlagReqOne
	case cmdWrite, cmdFlush, cmdTrim:
	default:
		return &rejection{errnoInval, fmt.Sprintf("unsupported command %s", commandName(r.typ))}
	}
	if bad := r.flags &^ allowed; bad != 0 {
		return &rejection{errnoInval, fmt.Sprintf("%s: command flags %#x not valid for it", commandName(r.typ), bad)}
	}
	if r.typ == cmdFlush {
		if r.offset != 0 || r.length != 0 {
			return &rejection{errnoInval, fmt.Sprintf("flush with offset %d length %d, both must be zero", r.offset, r.length)}
		}
		return nil
	}
	if r.offset%uint64(l.minBlock) != 0 || r.length%l.minBlock != 0 {
		return &rejection{errnoInval, fmt.Sprintf("%s at offset %d length %d is not aligned to %d bytes",
			commandName(r.typ), r.offset, r.length, l.minBlock)}
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > l.maxPayload {
		e := errnoInval
		if r.typ == cmdRead && l.structured {
			e = errnoOverflow // the protocol's answer to a structured read too large to send at once
		}
		return &rejection{e, fmt.Sprintf("%s of %d bytes exceeds the maximum payload of %d bytes",
			commandName(r.typ), r.length, l.maxPayload)}
	}
	if r.offset > l.size || uint64(r.length) > l.size-r.offset {
		e := errnoInval // reads and trims beyond the end
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			e = errnoNoSpc
		}
		return &rejection{e, fmt.Sprintf("%s at offset %d length %d is beyond the export size of %d bytes",
			commandName(r.typ), r.offset, r.length, l.size)}
	}
	return nil
}
