// Package nbdc is a small NBD client for the fault-injection suite
// (test/nemesis): the fixed newstyle handshake with NBD_OPT_GO, and
// NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH and NBD_CMD_DISC with simple
// replies, many requests in flight on one connection, matched by handle.
// When the connection breaks, every request in flight fails with
// ErrConnLost (its outcome is unknown) and so does every later one.
package nbdc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Protocol constants (docs/nbd.md, the NBD protocol).
const (
	nbdMagic       = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic       = 0x49484156454F5054 // "IHAVEOPT"
	repMagic       = 0x3e889045565a9
	requestMagic   = 0x25609513
	replyMagic     = 0x67446698
	flagFixed      = 1 << 0
	flagNoZeroes   = 1 << 1
	clientFixed    = 1 << 0
	clientNoZeroes = 1 << 1
	optGo          = 7
	repAck         = 1
	repInfo        = 3
	infoExport     = 0
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
)

// ErrConnLost fails the requests in flight when the connection breaks, and
// every request after: their outcome is unknown.
var ErrConnLost = errors.New("nbd: connection lost")

// Error is an error the server answered (an NBD errno).
type Error struct{ Errno uint32 }

func (e *Error) Error() string { return fmt.Sprintf("nbd: server error %d", e.Errno) }

// Conn is a negotiated NBD connection; its methods are safe for concurrent
// use.
type Conn struct {
	c    net.Conn
	size uint64

	wmu sync.Mutex // serialises requests on the wire
	mu  sync.Mutex
	// pending maps a handle to its request.
	pending map[uint64]*call
	next    uint64
	err     error // set once the connection broke
	done    chan struct{}
}

type call struct {
	buf  []byte // read destination
	errc chan error
}

// Dial connects to addr, negotiates export and starts reading replies.
func Dial(ctx context.Context, addr, export string) (*Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	size, err := handshake(c, export)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", addr, err)
	}
	c.SetDeadline(time.Time{})
	conn := &Conn{c: c, size: size, pending: map[uint64]*call{}, done: make(chan struct{})}
	go conn.readLoop()
	return conn, nil
}

func handshake(c net.Conn, export string) (uint64, error) {
	var hdr struct {
		Magic, OptMagic uint64
		Flags           uint16
	}
	if err := binary.Read(c, binary.BigEndian, &hdr); err != nil {
		return 0, err
	}
	if hdr.Magic != nbdMagic || hdr.OptMagic != optMagic || hdr.Flags&flagFixed == 0 {
		return 0, fmt.Errorf("not a fixed newstyle server (magic %x %x, flags %x)", hdr.Magic, hdr.OptMagic, hdr.Flags)
	}
	cflags := uint32(clientFixed)
	if hdr.Flags&flagNoZeroes != 0 {
		cflags |= clientNoZeroes
	}
	// NBD_OPT_GO: name length, name, no information requests.
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 0)
	msg := binary.BigEndian.AppendUint32(nil, cflags)
	msg = binary.BigEndian.AppendUint64(msg, optMagic)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := c.Write(msg); err != nil {
		return 0, err
	}
	var size uint64
	for {
		var rep struct {
			Magic uint64
			Opt   uint32
			Type  uint32
			Len   uint32
		}
		if err := binary.Read(c, binary.BigEndian, &rep); err != nil {
			return 0, err
		}
		if rep.Magic != repMagic || rep.Opt != optGo || rep.Len > 1<<20 {
			return 0, fmt.Errorf("bad option reply (magic %x, option %d, length %d)", rep.Magic, rep.Opt, rep.Len)
		}
		body := make([]byte, rep.Len)
		if _, err := io.ReadFull(c, body); err != nil {
			return 0, err
		}
		switch {
		case rep.Type == repAck:
			if size == 0 {
				return 0, errors.New("no NBD_INFO_EXPORT before the acknowledgement")
			}
			return size, nil
		case rep.Type == repInfo:
			if len(body) >= 12 && binary.BigEndian.Uint16(body) == infoExport {
				size = binary.BigEndian.Uint64(body[2:])
			}
		case rep.Type&(1<<31) != 0:
			return 0, fmt.Errorf("export %q refused (reply type %#x): %s", export, rep.Type, body)
		}
	}
}

// Size is the export's size in bytes.
func (c *Conn) Size() uint64 { return c.size }

// readLoop matches replies to requests until the connection breaks.
func (c *Conn) readLoop() {
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(c.c, hdr[:]); err != nil {
			c.fail(err)
			return
		}
		magic, errno, handle := binary.BigEndian.Uint32(hdr[:]), binary.BigEndian.Uint32(hdr[4:]), binary.BigEndian.Uint64(hdr[8:])
		if magic != replyMagic {
			c.fail(fmt.Errorf("bad reply magic %x", magic))
			return
		}
		c.mu.Lock()
		cl := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if cl == nil {
			c.fail(fmt.Errorf("reply to unknown handle %d", handle))
			return
		}
		if errno != 0 {
			cl.errc <- &Error{Errno: errno}
			continue
		}
		if cl.buf != nil {
			if _, err := io.ReadFull(c.c, cl.buf); err != nil {
				cl.errc <- ErrConnLost
				c.fail(err)
				return
			}
		}
		cl.errc <- nil
	}
}

// fail breaks the connection: every request in flight gets ErrConnLost.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = fmt.Errorf("%w: %v", ErrConnLost, err)
		close(c.done)
	}
	pending := c.pending
	c.pending = map[uint64]*call{}
	c.mu.Unlock()
	c.c.Close()
	for _, cl := range pending {
		cl.errc <- ErrConnLost
	}
}

// Err returns why the connection broke, or nil.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close breaks the connection (requests in flight fail with ErrConnLost).
func (c *Conn) Close() error {
	c.fail(errors.New("closed"))
	return nil
}

// do sends one request and waits for its reply or ctx; when ctx ends first
// the connection is broken (the request's outcome is unknown).
func (c *Conn) do(ctx context.Context, cmd uint16, off uint64, length uint32, payload, buf []byte) error {
	cl := &call{buf: buf, errc: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.next++
	handle := c.next
	c.pending[handle] = cl
	c.mu.Unlock()
	req := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(req, requestMagic)
	binary.BigEndian.PutUint16(req[4:], 0)
	binary.BigEndian.PutUint16(req[6:], cmd)
	binary.BigEndian.PutUint64(req[8:], handle)
	binary.BigEndian.PutUint64(req[16:], off)
	binary.BigEndian.PutUint32(req[24:], length)
	req = append(req, payload...)
	c.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		c.c.SetWriteDeadline(dl)
	}
	_, err := c.c.Write(req)
	c.wmu.Unlock()
	if err != nil {
		c.fail(err)
	}
	select {
	case err := <-cl.errc:
		return err
	case <-ctx.Done():
		c.fail(fmt.Errorf("request abandoned: %w", ctx.Err()))
		return <-cl.errc
	}
}

// ReadAt reads len(p) bytes at off.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off int64) error {
	return c.do(ctx, cmdRead, uint64(off), uint32(len(p)), nil, p)
}

// WriteAt writes p at off.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off int64) error {
	return c.do(ctx, cmdWrite, uint64(off), uint32(len(p)), p, nil)
}

// Flush asks the server to make completed writes durable.
func (c *Conn) Flush(ctx context.Context) error { return c.do(ctx, cmdFlush, 0, 0, nil, nil) }

// Disconnect sends NBD_CMD_DISC and closes the connection.
func (c *Conn) Disconnect() error {
	req := make([]byte, 28)
	binary.BigEndian.PutUint32(req, requestMagic)
	binary.BigEndian.PutUint16(req[6:], cmdDisc)
	c.wmu.Lock()
	c.c.SetWriteDeadline(time.Now().Add(time.Second))
	_, err := c.c.Write(req)
	c.wmu.Unlock()
	c.fail(errors.New("disconnected"))
	return err
}
