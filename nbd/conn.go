package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"cairn.io/cairn/blockdev"
)

// aLongTimeAgo is a read deadline in the past: it makes a blocked read return at once.
var aLongTimeAgo = time.Unix(1, 0)

// serverConn is one client connection: the handshake, then the transmission phase.
//
// In transmission one goroutine at a time reads requests in order. Each request that passes
// validation takes a slot from the connection's limiter (count and payload bytes), has its WRITE
// payload read into a pooled buffer, and runs on a worker goroutine, or on the reading goroutine
// itself when it arrived alone (inline.go). A request's goroutine calls the
// backend and sends the reply itself (replies that complete while another is written leave
// together with the next write: see send), so replies leave in completion order, not
// arrival order. WRITE, TRIM and WRITE_ZEROES are numbered on arrival; a FLUSH waits for every
// write that arrived before it to complete, then calls the Device's Flush.
type serverConn struct {
	srv *Server
	nc  net.Conn
	r   *bufio.Reader
	log *slog.Logger

	dmu        sync.Mutex    // guards stopReason, dead, exportName and changes of the read deadline
	stopReason string        // non-empty once the connection has been told to stop reading
	dead       bool          // the connection broke (a reply could not be sent, the backend panicked)
	disc       bool          // the reader read NBD_CMD_DISC: every request is read (see reapHungUp)
	stopCh     chan struct{} // closed when stopReason is first set
	exportName string        // the export in transmission, for DropExport
	// drain is where this connection stands in the draining of its export's dead connections;
	// guarded by srv.mu (see Server.beginDrain).
	drain drainState

	// liveSize: the client learns the export's size out of band, not from this server (a
	// connection without a handshake): a request beyond the size known so far reads it again.
	liveSize bool

	// Negotiated in the handshake.
	tls        bool // NBD_OPT_STARTTLS upgraded the connection
	noZeroes   bool
	structured bool
	allocation bool   // base:allocation selected (for metaExport)
	metaExport string // the export NBD_OPT_SET_META_CONTEXT named

	// Set when transmission starts.
	export   *openedExport
	limits   exportLimits
	lim      *limiter
	writes   *writeTracker
	inflight sync.WaitGroup
	work     chan *operation // hands a request to an idle worker
	done     chan struct{}   // closed when the connection ends: workers exit
	workers  atomic.Int32    // workers started, by the reading goroutine (or passReading for it)
	role     chan struct{}   // hands the reading of requests to an idle worker (inline.go)
	reading  sync.Mutex      // held by the goroutine reading requests (inline.go)
	readEnd  chan error      // why the reading of requests ended; sent once
	pass     *time.Timer     // passes the reading on when a request run inline takes long
	hdr      [requestHdrSize]byte

	// ioCtx is the context of the connection's backend calls; ioCancel is called when the
	// connection dies (see transmit).
	ioCtx    context.Context
	ioCancel context.CancelFunc

	// Replies (see send); guarded by wmu.
	wmu         sync.Mutex
	wspace      *sync.Cond // on wmu: a write ended (room in pending, or the writer's role is free)
	flushing    bool       // a goroutine is writing replies
	pending     []byte     // replies waiting for the writer
	spare       []byte     // an empty buffer for the next pending
	writeFailed bool       // a reply could not be sent, the stream is broken
}

func newServerConn(s *Server, nc net.Conn) *serverConn {
	c := &serverConn{
		srv:    s,
		nc:     nc,
		r:      bufio.NewReaderSize(nc, 64<<10),
		log:    s.log.With("remote", nc.RemoteAddr().String()),
		stopCh: make(chan struct{}),
	}
	c.wspace = sync.NewCond(&c.wmu)
	c.ioCtx, c.ioCancel = context.WithCancel(context.Background())
	return c
}

// serve runs the connection, handshake first, to its end and releases it.
func (c *serverConn) serve() { _ = c.serveWith(c.handshake) }

// serveWith runs the connection to its end and releases it: enter negotiates (or, for a connection
// without a handshake, opens) the export, then the transmission phase runs. It returns why the
// transmission ended (errClientDisconnected after NBD_CMD_DISC), or why it never began.
func (c *serverConn) serveWith(enter func() (*openedExport, error)) (err error) {
	defer c.ioCancel()
	st := &c.srv.stats
	st.connectionsTotal.Add(1)
	st.connections.Add(1)
	defer st.connections.Add(-1)
	defer c.srv.trackConn(c, false)
	defer c.nc.Close()
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("nbd: connection failed on a bug; closed", "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("nbd: connection failed on a bug: %v", r)
		}
	}()

	opened, err := enter()
	if err != nil {
		switch {
		case errors.Is(err, errClientAborted):
			c.log.Debug("nbd: client ended the handshake")
		case c.stopped() != "":
			c.log.Info("nbd: handshake interrupted", "reason", c.stopped())
		default:
			st.handshakesFailed.Add(1)
			if errors.Is(err, errProtocol) {
				st.protocolErrors.Add(1)
			}
			c.log.Warn("nbd: handshake failed; connection closed", "err", err)
		}
		return err
	}
	return c.transmit(opened)
}

// stop makes the request reader return: it stops reading, lets the requests in flight complete
// and answer, then the connection closes. Safe to call more than once and from any goroutine.
func (c *serverConn) stop(reason string) {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if c.stopReason == "" {
		c.stopReason = reason
		close(c.stopCh)
	}
	_ = c.nc.SetReadDeadline(aLongTimeAgo)
}

// kill stops a connection that broke: unlike stop (Close, DropExport), its requests in flight
// are cancelled, as when the client goes away.
func (c *serverConn) kill(reason string) {
	c.dmu.Lock()
	c.dead = true
	c.dmu.Unlock()
	c.stop(reason)
}

// killed reports whether the connection was killed (kill).
func (c *serverConn) killed() bool {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	return c.dead
}

// died reports whether the reader's end, err, means the connection died: the client went away
// without NBD_CMD_DISC, the stream broke, or the connection was killed; not a disconnect, nor a
// stop by Close or DropExport.
func (c *serverConn) died(err error) bool {
	if errors.Is(err, errClientDisconnected) {
		return false
	}
	c.dmu.Lock()
	defer c.dmu.Unlock()
	return c.stopReason == "" || c.dead
}

func (c *serverConn) stopped() string {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	return c.stopReason
}

// setReadDeadline sets the read deadline unless the connection has been stopped.
func (c *serverConn) setReadDeadline(t time.Time) {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if c.stopReason != "" {
		t = aLongTimeAgo
	}
	_ = c.nc.SetReadDeadline(t)
}

// errClientDisconnected is the end of a connection by NBD_CMD_DISC.
var errClientDisconnected = errors.New("client sent NBD_CMD_DISC")

// transmit runs the transmission phase on the export chosen in the handshake. It returns after the
// last request has been answered and the export has been closed, with the reason the request reader
// stopped.
func (c *serverConn) transmit(opened *openedExport) (err error) {
	c.export = opened
	c.log = c.log.With("export", opened.name)
	c.limits = exportLimits{
		size:       opened.size,
		minBlock:   MinBlockSize,
		maxPayload: c.srv.cfg.MaxPayload,
		structured: c.structured,
		// The metadata context holds only for the export it was set for.
		blockStatus: c.structured && c.allocation && c.metaExport == opened.name,
	}
	c.lim = newLimiter(c.srv.cfg.MaxInFlight, c.srv.cfg.MaxInFlightBytes, &c.srv.stats.inFlightBytes, c.srv.cfg.TestingKnobs.OnInFlightBytes)
	c.writes = newWriteTracker()
	c.work, c.done = make(chan *operation), make(chan struct{})
	c.role, c.readEnd = make(chan struct{}), make(chan error, 1)
	c.pass = time.AfterFunc(time.Hour, c.passReading)
	c.pass.Stop()
	c.setReadDeadline(time.Time{}) // a client may stay idle as long as it likes
	c.log.Info("nbd: client attached", "size", opened.size, "structured_replies", c.structured)

	defer func() {
		// A connection that died has its requests cancelled: nobody reads their replies, and
		// a retrying write must not land after a newer write from the client's next
		// connection. That connection waits (waitDrained) until they all returned. A
		// disconnect, Close and DropExport let the requests complete and answer instead.
		if c.died(err) {
			c.srv.beginDrain(c, opened.name)
			c.ioCancel()
		}
		// Also on a panic of the reader: the requests in flight still own the export.
		c.inflight.Wait()
		c.srv.endDrain(c, opened.name)
		close(c.done)
		if cerr := opened.exp.Close(); cerr != nil {
			c.log.Warn("nbd: close export", "err", cerr)
		}
		switch {
		case errors.Is(err, errClientDisconnected):
			c.log.Info("nbd: client detached")
		case errors.Is(err, errProtocol):
			c.srv.stats.protocolErrors.Add(1)
			c.log.Warn("nbd: protocol violation; connection closed", "err", err)
		default:
			c.log.Info("nbd: connection closed", "reason", err)
		}
	}()
	// Named only now that the deferred end above will take the connection out of a drain that
	// reapHungUp may count it in from here on.
	c.dmu.Lock()
	c.exportName = opened.name
	c.dmu.Unlock()
	c.srv.reapHungUp(c, opened.name)
	if !c.srv.waitDrained(c, opened.name) {
		return errors.New("stopped while waiting for a dead connection's requests")
	}
	// The requests are read on a worker: this goroutine stays free to act on the end of the
	// reading (above) while a request the reader ran itself may wait in the backend.
	c.workers.Add(1)
	go c.worker(nil)
	return <-c.readEnd
}

// operation is one request that passed validation, on its way through the backend.
type operation struct {
	req     request
	arrived time.Time
	weight  int64   // what it holds of the limiter's byte budget
	payload *[]byte // WRITE data
	seq     uint64  // write number (WRITE, TRIM, WRITE_ZEROES)
	barrier uint64  // FLUSH: writes numbered below it must complete first
}

func (op *operation) isWrite() bool {
	return op.req.typ == cmdWrite || op.req.typ == cmdTrim || op.req.typ == cmdWriteZeroes
}

// readLoop reads and dispatches requests until the client disconnects, the connection is
// stopped or the stream breaks, and returns why it stopped; or until it passed the reading to
// another goroutine while a request ran on this one (runInline), and returns nil.
func (c *serverConn) readLoop(inline *bool) error {
	hdr := c.hdr[:]
	for {
		if _, err := io.ReadFull(c.r, hdr); err != nil {
			return c.readError("read request header", err)
		}
		arrived := time.Now()
		req, err := parseRequestHeader(hdr)
		if err != nil {
			return fmt.Errorf("%w: %w", errProtocol, err)
		}
		if req.typ == cmdDisc {
			c.dmu.Lock()
			c.disc = true
			c.dmu.Unlock()
			return errClientDisconnected
		}
		if c.liveSize && (req.offset > c.limits.size || uint64(req.length) > c.limits.size-req.offset) {
			c.learnSize()
		}
		if rej := c.limits.check(req); rej != nil {
			if req.hasPayload() {
				// Keep the stream in step: the payload follows whatever the server thinks of it.
				if _, err := io.CopyN(io.Discard, c.r, int64(req.length)); err != nil {
					return c.readError("discard payload of a refused write", err)
				}
			}
			c.log.Debug("nbd: request refused", "cmd", commandName(req.typ), "errno", errnoName(rej.errno), "msg", rej.msg)
			_ = c.sendStatus(req, rej.errno, rej.msg)
			c.finish(req, arrived, rej.errno)
			continue
		}
		op := &operation{req: req, arrived: arrived}
		if req.typ == cmdRead || req.typ == cmdWrite {
			op.weight = int64(req.length)
		}
		c.lim.acquire(op.weight)
		if req.typ == cmdWrite {
			op.payload = getBuffer(req.length)
			if _, err := io.ReadFull(c.r, *op.payload); err != nil {
				putBuffer(op.payload)
				c.lim.release(op.weight)
				return c.readError("read write payload", err)
			}
		}
		if c.killed() {
			// A newer connection to the export found the client gone (reapHungUp) while
			// this request was on its way in: it must not run after that connection's.
			if op.payload != nil {
				putBuffer(op.payload)
			}
			c.lim.release(op.weight)
			return errors.New(c.stopped())
		}
		switch {
		case op.isWrite():
			op.seq = c.writes.begin()
		case req.typ == cmdFlush:
			op.barrier = c.writes.barrier()
		}
		c.inflight.Add(1)
		c.srv.stats.inFlight.Add(1)
		if c.runsInline(op) {
			if c.runInline(op, inline) {
				return nil
			}
			continue
		}
		c.dispatch(op)
	}
}

// dispatch hands op to an idle worker, starting one when none is idle and
// fewer than maxWorkers exist; otherwise it waits for one to finish, which
// the limiter guarantees is close.
func (c *serverConn) dispatch(op *operation) {
	if c.workers.Load() >= c.maxWorkers() {
		c.work <- op
		return
	}
	select {
	case c.work <- op:
	default:
		c.workers.Add(1)
		go c.worker(op)
	}
}

// maxWorkers bounds the workers of a connection: one for each request in flight, and the one
// reading.
func (c *serverConn) maxWorkers() int32 { return int32(c.srv.cfg.MaxInFlight) + 1 }

// worker runs op (or, when op is nil, takes over the reading of requests), then every
// request or reading handed to it, until the connection ends. Reusing workers spares each
// request a fresh goroutine whose stack would grow again through the client and gRPC.
func (c *serverConn) worker(op *operation) {
	for {
		if op != nil {
			c.run(op)
		} else {
			c.readRequests()
		}
		select {
		case op = <-c.work:
		case <-c.role:
			op = nil
		case <-c.done:
			return
		}
	}
}

// readError classifies the error that ended the request reader.
func (c *serverConn) readError(what string, err error) error {
	if reason := c.stopped(); reason != "" {
		return errors.New(reason)
	}
	if errors.Is(err, io.EOF) && what == "read request header" {
		return errors.New("client hung up without NBD_CMD_DISC")
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%s: client hung up mid-message: %w", what, errProtocol)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// run executes one operation and answers it.
func (c *serverConn) run(op *operation) {
	defer c.inflight.Done()
	defer c.srv.stats.inFlight.Add(-1)
	defer c.lim.release(op.weight)

	res := c.execute(op)
	errno, msg := uint32(0), ""
	if res.err != nil {
		errno = errnoFor(res.err)
		msg = fmt.Sprintf("%s at offset %d length %d: %v", commandName(op.req.typ), op.req.offset, op.req.length, res.err)
		c.log.Warn("nbd: request failed", "cmd", commandName(op.req.typ), "offset", op.req.offset,
			"length", op.req.length, "errno", errnoName(errno), "err", res.err)
	}
	switch {
	case op.req.typ == cmdRead:
		_ = c.sendRead(op.req, *res.data, res.n, errno, msg)
		putBuffer(res.data)
	case op.req.typ == cmdBlockStatus && errno == 0:
		_ = c.sendBlockStatus(op.req, res.ext)
	default:
		_ = c.sendStatus(op.req, errno, msg)
	}
	c.finish(op.req, op.arrived, errno)
}

type result struct {
	data *[]byte           // READ: buffer of the request's length
	n    int               // READ: bytes read before an error
	ext  []blockdev.Extent // BLOCK_STATUS
	err  error
}

// execute calls the backend for one operation.
func (c *serverConn) execute(op *operation) (res result) {
	if op.isWrite() {
		defer c.writes.end(op.seq)
	}
	if op.req.typ == cmdRead {
		res.data = getBuffer(op.req.length)
	}
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("nbd: backend panicked; connection will close", "panic", r, "stack", string(debug.Stack()))
			res.err = fmt.Errorf("backend panicked: %v", r)
			res.n = 0
			c.kill("backend panicked")
		}
	}()
	exp, ctx := c.export.exp, c.ioCtx
	off, length := int64(op.req.offset), int64(op.req.length)
	fua := op.req.flags&cmdFlagFUA != 0
	switch op.req.typ {
	case cmdRead:
		res.n, res.err = readFullAt(ctx, exp, *res.data, off)
		return res
	case cmdBlockStatus:
		res.ext, res.err = c.blockStatus(ctx, exp, off, length, op.req.flags&cmdFlagReqOne != 0)
		return res
	case cmdWrite:
		res.err = writeFullAt(ctx, exp, *op.payload, off)
		putBuffer(op.payload)
	case cmdFlush:
		c.writes.waitBefore(op.barrier)
		if err := exp.Flush(ctx); err != nil {
			res.err = fmt.Errorf("flush: %w", err)
		}
		return res
	case cmdTrim:
		if length > 0 {
			if err := exp.UnmapAt(ctx, off, length); err != nil {
				res.err = fmt.Errorf("unmap: %w", err)
			}
		}
	case cmdWriteZeroes:
		if length > 0 {
			if op.req.flags&cmdFlagNoHole != 0 {
				// The client wants the range provisioned: write real zeros.
				res.err = writeZeroes(ctx, exp, off, length)
			} else if err := exp.UnmapAt(ctx, off, length); err != nil {
				res.err = fmt.Errorf("unmap: %w", err)
			}
		}
	}
	if res.err == nil && fua && length > 0 {
		if err := exp.Flush(ctx); err != nil {
			res.err = fmt.Errorf("flush for FUA: %w", err)
		}
	}
	return res
}

// readFullAt reads len(p) bytes or reports how many it got before the error.
func readFullAt(ctx context.Context, b blockdev.Device, p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, err := b.ReadAt(ctx, p, off)
	if n == len(p) {
		return n, nil // io.ReaderAt may return io.EOF with a full read at the end
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return max(0, min(n, len(p))), fmt.Errorf("read: %w", err)
}

func writeFullAt(ctx context.Context, b blockdev.Device, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	n, err := b.WriteAt(ctx, p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

func writeZeroes(ctx context.Context, b blockdev.Device, off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(zeroes)))
		if err := writeFullAt(ctx, b, zeroes[:n], off); err != nil {
			return fmt.Errorf("write zeroes at %d: %w", off, err)
		}
		off += n
		length -= n
	}
	return nil
}

// errnoFor maps a backend error to the protocol's error values.
func errnoFor(err error) uint32 {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errnoNoSpc
	case errors.Is(err, syscall.EROFS):
		return errnoPerm
	}
	return errnoIO
}

// finish counts an answered request and reports it to the OnRequest hook.
func (c *serverConn) finish(req request, arrived time.Time, errno uint32) {
	st := &c.srv.stats
	switch req.typ {
	case cmdRead:
		st.reads.Add(1)
		if errno == 0 {
			st.readBytes.Add(uint64(req.length))
		}
	case cmdWrite:
		st.writes.Add(1)
		if errno == 0 {
			st.writeBytes.Add(uint64(req.length))
		}
	case cmdFlush:
		st.flushes.Add(1)
	case cmdTrim:
		st.trims.Add(1)
	case cmdWriteZeroes:
		st.writeZeroes.Add(1)
	}
	if errno != 0 {
		st.requestErrors.Add(1)
	}
	if hook := c.srv.cfg.OnRequest; hook != nil {
		hook(RequestEvent{
			Export:   c.export.name,
			Command:  commandName(req.typ),
			Offset:   req.offset,
			Length:   req.length,
			Duration: time.Since(arrived),
			Errno:    errno,
		})
	}
}
