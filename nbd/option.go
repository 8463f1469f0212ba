package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// errBadMagic is returned by the header parsers when a message does not start with its magic
// number. The stream cannot be resynchronised: the connection is closed.
var errBadMagic = errors.New("nbd: bad magic")

// errMalformedOption is returned when the data of an option does not follow its documented layout.
// The server answers NBD_REP_ERR_INVALID and the negotiation goes on.
var errMalformedOption = errors.New("nbd: malformed option")

// optionHeader is the fixed part of an option sent during the handshake.
type optionHeader struct {
	option uint32
	length uint32
}

// parseOptionHeader decodes the 16-byte option header.
func parseOptionHeader(b []byte) (optionHeader, error) {
	if len(b) != optionHdrSize {
		return optionHeader{}, fmt.Errorf("option header of %d bytes: %w", len(b), errMalformedOption)
	}
	if m := binary.BigEndian.Uint64(b[0:8]); m != magicOpts {
		return optionHeader{}, fmt.Errorf("option magic %#x: %w", m, errBadMagic)
	}
	return optionHeader{
		option: binary.BigEndian.Uint32(b[8:12]),
		length: binary.BigEndian.Uint32(b[12:16]),
	}, nil
}

// infoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the information
// items the client asks for.
type infoRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest decodes the data of NBD_OPT_INFO or NBD_OPT_GO:
// name length (32 bits), name, number of requests (16 bits), requests (16 bits each).
// The lengths must account for the data exactly.
func parseInfoRequest(data []byte) (infoRequest, error) {
	if len(data) < 6 {
		return infoRequest{}, fmt.Errorf("info request of %d bytes, need at least 6: %w", len(data), errMalformedOption)
	}
	nameLen := uint64(binary.BigEndian.Uint32(data[0:4]))
	if nameLen > uint64(len(data)-6) {
		return infoRequest{}, fmt.Errorf("export name length %d exceeds option data of %d bytes: %w", nameLen, len(data), errMalformedOption)
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	n := int(binary.BigEndian.Uint16(rest[0:2]))
	rest = rest[2:]
	if len(rest) != 2*n {
		return infoRequest{}, fmt.Errorf("%d information requests need %d bytes, option has %d: %w", n, 2*n, len(rest), errMalformedOption)
	}
	req := infoRequest{name: name, infos: make([]uint16, n)}
	for i := range n {
		req.infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	if err := checkExportName(name); err != nil {
		return infoRequest{}, err
	}
	return req, nil
}

// checkExportName enforces the protocol's rules for strings: valid UTF-8, no NUL, at most 4096 bytes.
func checkExportName(name string) error {
	if len(name) > maxStringLen {
		return fmt.Errorf("export name of %d bytes, limit %d: %w", len(name), maxStringLen, errMalformedOption)
	}
	if !utf8.ValidString(name) {
		return fmt.Errorf("export name is not UTF-8: %w", errMalformedOption)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("export name contains NUL: %w", errMalformedOption)
	}
	return nil
}

// wants reports whether the client asked for the information item.
func (r infoRequest) wants(item uint16) bool {
	for _, i := range r.infos {
		if i == item {
			return true
		}
	}
	return false
}

// appendOptionReply appends an option reply header and its data.
func appendOptionReply(b []byte, option, reply uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, magicOptReply)
	b = binary.BigEndian.AppendUint32(b, option)
	b = binary.BigEndian.AppendUint32(b, reply)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// truncateString cuts s to the protocol's string limit at a rune boundary.
func truncateString(s string) string {
	if len(s) <= maxStringLen {
		return s
	}
	s = s[:maxStringLen]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}
