package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// testClient is a hand-written NBD client that checks every byte the server sends. It exists so
// that tests can send what real clients never do (bad magic, unaligned or oversized requests,
// unknown options) and assert the exact answer.
type testClient struct {
	t          testing.TB
	nc         net.Conn
	r          *bufio.Reader
	structured bool
	size       uint64
	tflags     uint16

	mu      sync.Mutex
	pending map[uint64]request // requests sent and not yet answered, by cookie
	partial map[uint64]*reply  // structured replies being assembled
	cookie  uint64
}

type optReply struct {
	option uint32
	typ    uint32
	data   []byte
}

type chunk struct {
	flags, typ uint16
	payload    []byte
}

type reply struct {
	cookie  uint64
	req     request
	simple  bool
	errno   uint32
	msg     string  // structured error message
	errOffs []int64 // offsets of NBD_REPLY_TYPE_ERROR_OFFSET chunks
	data    []byte  // READ: the data received (assembled from chunks)
	covered uint64  // READ: bytes covered by data chunks
	chunks  []chunk
}

// dialRaw connects and reads the server's greeting.
func dialRaw(t testing.TB, addr string) *testClient {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { nc.Close() })
	// No test waits this long unless the server is broken: fail instead of hanging.
	_ = nc.SetDeadline(time.Now().Add(60 * time.Second))
	c := &testClient{t: t, nc: nc, r: bufio.NewReader(nc), pending: map[uint64]request{}, partial: map[uint64]*reply{}}
	var g [18]byte
	if _, err := io.ReadFull(c.r, g[:]); err != nil {
		t.Fatalf("read greeting: %v", err)
	}
	if m := binary.BigEndian.Uint64(g[0:]); m != magicNBD {
		t.Fatalf("greeting magic %#x", m)
	}
	if m := binary.BigEndian.Uint64(g[8:]); m != magicOpts {
		t.Fatalf("greeting: want newstyle magic IHAVEOPT, got %#x (oldstyle?)", m)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x, want fixed newstyle | no zeroes", f)
	}
	return c
}

// dial connects and sends the client flags.
func dial(t testing.TB, addr string, clientFlags uint32) *testClient {
	t.Helper()
	c := dialRaw(t, addr)
	c.write(binary.BigEndian.AppendUint32(nil, clientFlags))
	return c
}

// structuredReplies negotiates structured replies.
func (c *testClient) structuredReplies() {
	c.t.Helper()
	c.sendOption(optStructuredReply, nil)
	if r := c.optionReply(); r.typ != repAck {
		c.t.Fatalf("NBD_OPT_STRUCTURED_REPLY: reply %#x", r.typ)
	}
	c.structured = true
}

// connect dials, negotiates (structured replies when asked) and enters transmission on name.
func connect(t testing.TB, addr, name string, structured bool) *testClient {
	t.Helper()
	c := dial(t, addr, clientFlagFixedNewstyle|clientFlagNoZeroes)
	if structured {
		c.structuredReplies()
	}
	replies := c.goExport(optGo, name, infoBlockSize)
	if last := replies[len(replies)-1]; last.typ != repAck {
		t.Fatalf("NBD_OPT_GO %q: reply %#x %q", name, last.typ, last.data)
	}
	return c
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) sendOption(option uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOpts)
	b = binary.BigEndian.AppendUint32(b, option)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

func (c *testClient) readOptionReply() (optReply, error) {
	var h [20]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return optReply{}, err
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOptReply {
		return optReply{}, fmt.Errorf("option reply magic %#x", m)
	}
	r := optReply{option: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c.r, r.data); err != nil {
		return optReply{}, err
	}
	return r, nil
}

func (c *testClient) optionReply() optReply {
	c.t.Helper()
	r, err := c.readOptionReply()
	if err != nil {
		c.t.Fatalf("read option reply: %v", err)
	}
	return r
}

// optionReplies reads replies up to the final one (an ACK or an error).
func (c *testClient) optionReplies(option uint32) []optReply {
	c.t.Helper()
	var out []optReply
	for {
		r := c.optionReply()
		if r.option != option {
			c.t.Fatalf("reply for option %d, want %d", r.option, option)
		}
		out = append(out, r)
		if r.typ != repInfo && r.typ != repServer {
			return out
		}
	}
}

// goExport sends NBD_OPT_INFO or NBD_OPT_GO and reads the replies; on success it records the
// size and transmission flags.
func (c *testClient) goExport(option uint32, name string, infos ...uint16) []optReply {
	c.t.Helper()
	c.sendOption(option, encodeInfoRequest(name, infos))
	replies := c.optionReplies(option)
	for _, r := range replies {
		if r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoExport {
			if len(r.data) != 12 {
				c.t.Fatalf("NBD_INFO_EXPORT of %d bytes", len(r.data))
			}
			c.size = binary.BigEndian.Uint64(r.data[2:])
			c.tflags = binary.BigEndian.Uint16(r.data[10:])
		}
	}
	return replies
}

func encodeInfoRequest(name string, infos []uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func encodeRequest(flags, typ uint16, cookie, offset uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, offset)
	return binary.BigEndian.AppendUint32(b, length)
}

// send sends a request (with payload for WRITE) and returns its cookie.
func (c *testClient) send(flags, typ uint16, offset uint64, length uint32, payload []byte) uint64 {
	c.t.Helper()
	c.mu.Lock()
	c.cookie++
	cookie := c.cookie<<8 | 0xa5 // not small integers: the server must echo all 64 bits
	c.pending[cookie] = request{flags: flags, typ: typ, cookie: cookie, offset: offset, length: length}
	c.mu.Unlock()
	c.write(append(encodeRequest(flags, typ, cookie, offset, length), payload...))
	return cookie
}

// recv reads messages until one reply is complete and returns it.
func (c *testClient) recv() (*reply, error) {
	for {
		var magic [4]byte
		if _, err := io.ReadFull(c.r, magic[:]); err != nil {
			return nil, err
		}
		switch m := binary.BigEndian.Uint32(magic[:]); m {
		case magicSimpleReply:
			return c.recvSimple()
		case magicStructuredReply:
			if !c.structured {
				return nil, errors.New("structured reply chunk without NBD_OPT_STRUCTURED_REPLY")
			}
			r, done, err := c.recvChunk()
			if err != nil || done {
				return r, err
			}
		default:
			return nil, fmt.Errorf("reply magic %#x", m)
		}
	}
}

func (c *testClient) take(cookie uint64) (request, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	req, ok := c.pending[cookie]
	if !ok {
		return request{}, fmt.Errorf("reply for unknown cookie %#x", cookie)
	}
	return req, nil
}

func (c *testClient) done(cookie uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.pending, cookie)
	delete(c.partial, cookie)
}

func (c *testClient) recvSimple() (*reply, error) {
	var h [12]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return nil, err
	}
	r := &reply{simple: true, errno: binary.BigEndian.Uint32(h[0:]), cookie: binary.BigEndian.Uint64(h[4:])}
	req, err := c.take(r.cookie)
	if err != nil {
		return nil, err
	}
	r.req = req
	if req.typ == cmdRead && c.structured {
		return nil, errors.New("simple reply to a READ after structured replies were negotiated")
	}
	if req.typ == cmdRead && r.errno == 0 {
		r.data = make([]byte, req.length)
		if _, err := io.ReadFull(c.r, r.data); err != nil {
			return nil, err
		}
		r.covered = uint64(req.length)
	}
	c.done(r.cookie)
	return r, nil
}

// recvChunk reads one structured chunk and checks it against the protocol's rules.
func (c *testClient) recvChunk() (*reply, bool, error) {
	var h [16]byte
	if _, err := io.ReadFull(c.r, h[:]); err != nil {
		return nil, false, err
	}
	ch := chunk{flags: binary.BigEndian.Uint16(h[0:]), typ: binary.BigEndian.Uint16(h[2:])}
	cookie := binary.BigEndian.Uint64(h[4:])
	ch.payload = make([]byte, binary.BigEndian.Uint32(h[12:]))
	if _, err := io.ReadFull(c.r, ch.payload); err != nil {
		return nil, false, err
	}
	req, err := c.take(cookie)
	if err != nil {
		return nil, false, err
	}
	c.mu.Lock()
	r := c.partial[cookie]
	if r == nil {
		r = &reply{cookie: cookie, req: req}
		if req.typ == cmdRead {
			r.data = make([]byte, req.length)
		}
		c.partial[cookie] = r
	}
	c.mu.Unlock()
	r.chunks = append(r.chunks, ch)
	p := ch.payload
	switch ch.typ {
	case replyTypeNone:
		if len(p) != 0 || ch.flags&replyFlagDone == 0 {
			return nil, false, fmt.Errorf("NBD_REPLY_TYPE_NONE with length %d flags %#x", len(p), ch.flags)
		}
	case replyTypeOffsetData:
		if req.typ != cmdRead || len(p) < 9 {
			return nil, false, fmt.Errorf("data chunk of %d bytes for %s", len(p), commandName(req.typ))
		}
		off := binary.BigEndian.Uint64(p)
		data := p[8:]
		if off < req.offset || off+uint64(len(data)) > req.offset+uint64(req.length) {
			return nil, false, fmt.Errorf("data chunk [%d,+%d) outside request [%d,+%d)", off, len(data), req.offset, req.length)
		}
		copy(r.data[off-req.offset:], data)
		r.covered += uint64(len(data))
	case replyTypeError, replyTypeErrorOffset:
		if len(p) < 6 {
			return nil, false, fmt.Errorf("error chunk of %d bytes", len(p))
		}
		errno := binary.BigEndian.Uint32(p)
		msgLen := int(binary.BigEndian.Uint16(p[4:]))
		fixed := 6
		if ch.typ == replyTypeErrorOffset {
			fixed = 14
		}
		if errno == 0 || len(p) != fixed+msgLen {
			return nil, false, fmt.Errorf("error chunk: errno %d, message length %d, payload %d", errno, msgLen, len(p))
		}
		r.msg = string(p[6 : 6+msgLen])
		if ch.typ == replyTypeErrorOffset {
			off := binary.BigEndian.Uint64(p[6+msgLen:])
			if off < req.offset || off >= req.offset+uint64(req.length) {
				return nil, false, fmt.Errorf("error offset %d outside request [%d,+%d)", off, req.offset, req.length)
			}
			r.errOffs = append(r.errOffs, int64(off))
		}
		if r.errno == 0 {
			r.errno = errno
		}
	case replyTypeBlockStatus:
		if req.typ != cmdBlockStatus || len(p) < 12 || (len(p)-4)%8 != 0 {
			return nil, false, fmt.Errorf("block status chunk of %d bytes for %s", len(p), commandName(req.typ))
		}
	default:
		return nil, false, fmt.Errorf("unknown chunk type %d", ch.typ)
	}
	if ch.flags&replyFlagDone == 0 {
		return r, false, nil
	}
	if req.typ == cmdRead && r.errno == 0 && r.covered != uint64(req.length) {
		return nil, false, fmt.Errorf("read reply covers %d of %d bytes", r.covered, req.length)
	}
	c.done(cookie)
	return r, true, nil
}

// do sends one request and waits for its reply.
func (c *testClient) do(flags, typ uint16, offset uint64, length uint32, payload []byte) *reply {
	c.t.Helper()
	cookie := c.send(flags, typ, offset, length, payload)
	r, err := c.recv()
	if err != nil {
		c.t.Fatalf("%s: %v", commandName(typ), err)
	}
	if r.cookie != cookie {
		c.t.Fatalf("reply cookie %#x, want %#x", r.cookie, cookie)
	}
	return r
}

func (c *testClient) read(offset uint64, length uint32) []byte {
	c.t.Helper()
	r := c.do(0, cmdRead, offset, length, nil)
	if r.errno != 0 {
		c.t.Fatalf("read at %d length %d: %s %s", offset, length, errnoName(r.errno), r.msg)
	}
	return r.data
}

func (c *testClient) writeAt(flags uint16, offset uint64, data []byte) {
	c.t.Helper()
	if r := c.do(flags, cmdWrite, offset, uint32(len(data)), data); r.errno != 0 {
		c.t.Fatalf("write at %d length %d: %s %s", offset, len(data), errnoName(r.errno), r.msg)
	}
}

// expectClosed asserts that the server closes the connection without sending anything more.
func (c *testClient) expectClosed() {
	c.t.Helper()
	b, err := c.r.ReadByte()
	if err == nil {
		c.t.Fatalf("server sent %#x, want the connection closed", b)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !isConnReset(err) {
		c.t.Fatalf("want the connection closed, got %v", err)
	}
}

func isConnReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && !op.Timeout()
}
