package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// Preface is what both sides write first on a wire connection.
const Preface = "CAIRNW01"

// HeaderSize is the size of a frame header.
const HeaderSize = 20

// DefaultMaxFrame is the default bound on a frame's payload (MaxFrame).
const DefaultMaxFrame = 4 << 20

// Method names a call or a one-way message; its meaning is the business of
// the packages that register handlers (api/chunkpb, api/transportpb).
type Method uint8

// kind is a frame's kind.
type kind uint8

const (
	kindRequest  kind = 1
	kindResponse kind = 2
	kindError    kind = 3
	kindCancel   kind = 4
	kindMessage  kind = 5
)

func (k kind) String() string {
	switch k {
	case kindRequest:
		return "request"
	case kindResponse:
		return "response"
	case kindError:
		return "error"
	case kindCancel:
		return "cancel"
	case kindMessage:
		return "message"
	}
	return fmt.Sprintf("kind %d", uint8(k))
}

// Errors callers branch on.
var (
	// ErrClosed is returned for calls on, or pending on, a connection that
	// has closed; it wraps the cause when there is one.
	ErrClosed = errors.New("wire: connection closed")
	// ErrFrameTooLarge is a frame whose payload exceeds the receiver's
	// MaxFrame; the receiver closes the connection.
	ErrFrameTooLarge = errors.New("wire: frame too large")
	// ErrProtocol is a malformed preface or frame; the connection closes.
	ErrProtocol = errors.New("wire: protocol error")
)

// RemoteError is a call the server answered with an error frame: an unknown
// method, an undecodable request or a handler's error.
type RemoteError struct {
	Method Method
	Msg    string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("wire: method %d: %s", e.Method, e.Msg)
}

// IsUnknownMethod reports a call the server answered that it serves no
// such method (a server older than its client).
func IsUnknownMethod(err error) bool {
	var re *RemoteError
	return errors.As(err, &re) && re.Msg == unknownMethod(re.Method)
}

// unknownMethod is the message of the error frame answering a request of a
// method the server does not serve.
func unknownMethod(m Method) string { return fmt.Sprintf("unknown method %d", m) }

// header is a decoded frame header.
type header struct {
	length  uint32
	kind    kind
	method  Method
	id      uint64
	timeout time.Duration // request frames; 0 for none
}

// appendHeader appends h to b.
func appendHeader(b []byte, h header) []byte {
	var us uint32
	if h.timeout > 0 {
		// Round up: the server must not give up before the client does.
		us = uint32(min((h.timeout+time.Microsecond-1)/time.Microsecond, time.Duration(^uint32(0))))
	}
	b = binary.BigEndian.AppendUint32(b, h.length)
	b = append(b, byte(h.kind), byte(h.method), 0, 0)
	b = binary.BigEndian.AppendUint64(b, h.id)
	return binary.BigEndian.AppendUint32(b, us)
}

// decodeHeader decodes a header, refusing unknown kinds, non-zero reserved
// bytes and payloads larger than maxFrame.
func decodeHeader(b []byte, maxFrame int) (header, error) {
	h := header{
		length: binary.BigEndian.Uint32(b[0:4]),
		kind:   kind(b[4]),
		method: Method(b[5]),
		id:     binary.BigEndian.Uint64(b[8:16]),
	}
	if us := binary.BigEndian.Uint32(b[16:20]); us > 0 {
		h.timeout = time.Duration(us) * time.Microsecond
	}
	switch {
	case h.kind < kindRequest || h.kind > kindMessage:
		return h, fmt.Errorf("%w: unknown frame kind %d", ErrProtocol, b[4])
	case b[6] != 0 || b[7] != 0:
		return h, fmt.Errorf("%w: reserved header bytes %#x %#x are not zero", ErrProtocol, b[6], b[7])
	case int64(h.length) > int64(maxFrame):
		return h, fmt.Errorf("%w: %s frame of %d bytes, limit %d", ErrFrameTooLarge, h.kind, h.length, maxFrame)
	}
	return h, nil
}

// readFrame reads one frame; the payload is read into a buffer from bufs
// that the caller returns with bufs.put.
func readFrame(r *bufio.Reader, hdr []byte, maxFrame int, bufs *bufferPool) (header, []byte, error) {
	if _, err := io.ReadFull(r, hdr); err != nil {
		return header{}, nil, err
	}
	h, err := decodeHeader(hdr, maxFrame)
	if err != nil {
		return h, nil, err
	}
	payload := bufs.get(int(h.length))
	if _, err := io.ReadFull(r, payload); err != nil {
		bufs.put(payload)
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return h, nil, err
	}
	return h, payload, nil
}

// readPreface reads and checks the peer's preface.
func readPreface(r io.Reader) error {
	var b [len(Preface)]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return fmt.Errorf("read preface: %w", err)
	}
	if string(b[:]) != Preface {
		return fmt.Errorf("%w: preface %q, want %q", ErrProtocol, b[:], Preface)
	}
	return nil
}
