package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"
)

// Replies of the transmission phase: simple replies, structured reply
// chunks, and the one write per reply under the connection's write lock.

// sendRead answers a READ. data is the request's buffer; n bytes of it are valid when errno is set.
//
// Simple replies carry the data after a zero error, or an error and no data. Structured replies
// carry one NBD_REPLY_TYPE_OFFSET_DATA chunk with the whole range (the reply is complete in memory
// before it is sent, so the chunk can be final); on an error, the whole blocks read before it in a
// data chunk, then an NBD_REPLY_TYPE_ERROR_OFFSET chunk at the first block not read.
func (c *serverConn) sendRead(req request, data []byte, n int, errno uint32, msg string) error {
	if !c.structured {
		if errno != 0 {
			return c.send(appendSimpleReply(nil, errno, req.cookie))
		}
		return c.send(appendSimpleReply(nil, 0, req.cookie), data)
	}
	if errno == 0 {
		if len(data) == 0 {
			return c.send(appendChunkHeader(nil, replyFlagDone, replyTypeNone, req.cookie, 0))
		}
		hdr := appendChunkHeader(nil, replyFlagDone, replyTypeOffsetData, req.cookie, uint32(8+len(data)))
		hdr = binary.BigEndian.AppendUint64(hdr, req.offset)
		return c.send(hdr, data)
	}
	good := n - n%int(c.limits.minBlock)
	var bufs [][]byte
	if good > 0 {
		hdr := appendChunkHeader(nil, 0, replyTypeOffsetData, req.cookie, uint32(8+good))
		hdr = binary.BigEndian.AppendUint64(hdr, req.offset)
		bufs = append(bufs, hdr, data[:good])
	}
	errOffset := req.offset + uint64(good)
	bufs = append(bufs, appendErrorChunk(nil, req.cookie, replyTypeErrorOffset, errno, msg, errOffset))
	return c.send(bufs...)
}

// sendStatus answers a request that carries no data back, or refuses any request (READ included)
// before it ran.
func (c *serverConn) sendStatus(req request, errno uint32, msg string) error {
	if !c.structured {
		return c.send(appendSimpleReply(nil, errno, req.cookie))
	}
	if errno == 0 {
		return c.send(appendChunkHeader(nil, replyFlagDone, replyTypeNone, req.cookie, 0))
	}
	return c.send(appendErrorChunk(nil, req.cookie, replyTypeError, errno, msg, 0))
}

// Replies waiting for the connection's writer (see send).
const (
	// maxPendingReplies bounds the bytes of replies waiting in a
	// connection's pending buffer; more wait for room.
	maxPendingReplies = 1 << 20
	// maxCopiedReply is the largest reply copied to the pending buffer; a
	// larger one waits until it can be written from its own buffers.
	maxCopiedReply = 64 << 10
	// writerRounds is how many writes of other requests' replies a request's
	// goroutine makes after its own before it hands the writer's role to a
	// goroutine of its own: its request is answered and should not stay
	// held (its buffers, its share of the limiter) by a steady stream.
	writerRounds = 4
)

// send writes one whole reply (its chunks in order). The first reply to find
// the connection idle is written at once, from its own buffers, with one
// writev, by its goroutine, which then writes what completed meanwhile:
// replies of up to maxCopiedReply bytes are copied to c.pending, and leave
// together, many in one write at depth. A larger reply, or one that finds
// maxPendingReplies bytes pending, waits for its turn. Once send returned,
// the reply's buffers are free: it was written or copied.
func (c *serverConn) send(bufs ...[]byte) error {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for {
		if c.writeFailed {
			return errors.New("nbd: connection broken")
		}
		if !c.flushing {
			break
		}
		if n <= maxCopiedReply && len(c.pending) < maxPendingReplies {
			for _, b := range bufs {
				c.pending = append(c.pending, b...)
			}
			return nil
		}
		c.wspace.Wait()
	}
	c.flushing = true
	out := net.Buffers(bufs)
	if err := c.writeLocked(&out, nil); err != nil {
		return err
	}
	for range writerRounds {
		if len(c.pending) == 0 {
			c.endWriterLocked()
			return nil
		}
		if err := c.writePendingLocked(); err != nil {
			return err
		}
	}
	if len(c.pending) == 0 {
		c.endWriterLocked()
		return nil
	}
	c.inflight.Add(1) // this goroutine's request still counts: the connection waits for the writer too
	go c.flushPending()
	return nil
}

// flushPending writes pending replies until none are left, as the
// connection's writer.
func (c *serverConn) flushPending() {
	defer c.inflight.Done()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for len(c.pending) > 0 {
		if err := c.writePendingLocked(); err != nil {
			return
		}
	}
	c.endWriterLocked()
}

// writePendingLocked writes what is pending, as the writer; wmu held.
func (c *serverConn) writePendingLocked() error {
	b := c.pending
	c.pending, c.spare = c.spare[:0], nil
	out := net.Buffers{b}
	return c.writeLocked(&out, b)
}

// writeLocked writes out as the writer, with wmu released meanwhile; buf,
// if not nil, is the pending buffer being written, kept as the spare for
// the next one. A failed write ends the writer's role and fails every reply
// after it. wmu held.
func (c *serverConn) writeLocked(out *net.Buffers, buf []byte) error {
	c.wmu.Unlock()
	err := c.write(out)
	c.wmu.Lock()
	if err != nil {
		c.writeFailed = true
		c.endWriterLocked()
		return err
	}
	if buf != nil && c.spare == nil && cap(buf) <= 2*maxPendingReplies {
		c.spare = buf[:0]
	}
	c.wspace.Broadcast() // room in pending
	return nil
}

// endWriterLocked gives the writer's role up; wmu held.
func (c *serverConn) endWriterLocked() {
	c.flushing = false
	c.wspace.Broadcast()
}

// write writes out to the connection, as the connection's one writer
// (c.flushing); it kills the connection when that fails.
func (c *serverConn) write(out *net.Buffers) error {
	if err := c.nc.SetWriteDeadline(time.Now().Add(c.srv.cfg.WriteTimeout)); err != nil {
		c.kill("cannot set write deadline")
		return err
	}
	if _, err := out.WriteTo(c.nc); err != nil {
		c.log.Info("nbd: reply not delivered; closing", "err", err)
		c.kill("reply could not be sent")
		return fmt.Errorf("send reply: %w", err)
	}
	return nil
}

func appendSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

func appendChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, magicStructuredReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, length)
}

// appendErrorChunk appends a final error chunk: NBD_REPLY_TYPE_ERROR, or NBD_REPLY_TYPE_ERROR_OFFSET
// with offset.
func appendErrorChunk(b []byte, cookie uint64, typ uint16, errno uint32, msg string, offset uint64) []byte {
	msg = truncateString(msg)
	length := 6 + len(msg)
	if typ == replyTypeErrorOffset {
		length += 8
	}
	b = appendChunkHeader(b, replyFlagDone, typ, cookie, uint32(length))
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if typ == replyTypeErrorOffset {
		b = binary.BigEndian.AppendUint64(b, offset)
	}
	return b
}
