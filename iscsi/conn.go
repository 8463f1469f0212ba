package iscsi

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"cairn.io/cairn/iscsi/pdu"
)

const reservedTag = 0xffffffff

// Reject reasons (RFC 7143 section 11.17.1).
const (
	rejectDataDigest      = 0x02
	rejectProtocolError   = 0x04
	rejectNotSupported    = 0x05
	rejectImmediate       = 0x06
	rejectInvalidPDUField = 0x09
)

// Protocol error sentinel values: the connection ends.
var (
	errProtocol = errors.New("iscsi: protocol error")
)

// conn is one TCP connection. Until login completes only the reader
// goroutine runs; afterwards a writer goroutine sends everything queued
// and, when enabled, a pinger probes an idle initiator.
type conn struct {
	srv *Server
	nc  net.Conn
	log *slog.Logger
	rd  pdu.Reader

	// ioCtx is the context of the backend calls of the connection's
	// commands. It is cancelled when the connection dies (the initiator
	// went away, did not answer a ping, or its session is reinstated),
	// so that their IO stops instead of retrying for nobody; the
	// connection's teardown then waits for every call to return.
	ioCtx    context.Context
	ioCancel context.CancelFunc
	// keepIO is set by Server.Close before it drops a connection that did
	// not log out in time: its commands run to completion instead.
	keepIO atomic.Bool

	// Set by login, read-only afterwards.
	sess   *session
	params params
	cid    uint16

	// Writer state.
	wmu      sync.Mutex
	queue    []*outPDU
	wake     chan struct{}
	statSN   uint32 // next StatSN; owned by the writer after login
	closing  chan struct{}
	closeMu  sync.Once
	ffp      atomic.Bool // full feature phase reached
	lastRecv atomic.Int64

	// Task state, guarded by mu.
	mu        sync.Mutex
	tasks     map[uint32]*task
	nextTTT   uint32
	pingTTT   uint32
	pingSent  time.Time
	text      *textState
	memUsed   int64          // solicited data and read buffers charged by tasks (see chargeLocked)
	unsolUsed int64          // unsolicited data buffers of tasks (see Config.MaxSessionBuffer)
	immData   int            // immediate SCSI commands with data-out (at most immediateDataSlots)
	memWait   []*task        // tasks waiting for buffer memory
	execWG    sync.WaitGroup // running command goroutines
}

// outPDU is a PDU queued for the writer.
type outPDU struct {
	p *pdu.PDU
	// status marks PDUs that carry status and consume a StatSN.
	status bool
	// keepStatSN leaves bytes 24-27 as set (Data-In without status).
	keepStatSN bool
	// closeAfter ends the connection once the PDU is sent (logout).
	closeAfter bool
	// after, when set, is called by the writer once the PDU is written
	// (it releases the buffer memory of a read's data).
	after func()
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:     s,
		nc:      nc,
		log:     s.log.With("remote", nc.RemoteAddr().String()),
		wake:    make(chan struct{}, 1),
		closing: make(chan struct{}),
		tasks:   make(map[uint32]*task),
	}
	c.ioCtx, c.ioCancel = context.WithCancel(context.Background())
	c.rd.R = bufio.NewReaderSize(nc, 64<<10)
	c.rd.MaxData = s.cfg.MaxRecvDataSegmentLength
	c.lastRecv.Store(time.Now().UnixNano())
	return c
}

// close ends the connection; safe to call more than once and from any
// goroutine.
func (c *conn) close() {
	c.closeMu.Do(func() {
		close(c.closing)
		c.nc.Close()
	})
}

func (c *conn) isClosing() bool {
	select {
	case <-c.closing:
		return true
	default:
		return false
	}
}

// serve runs the connection: login, then full feature phase until the
// connection ends, then tears the session down.
func (c *conn) serve() {
	defer c.ioCancel()
	defer c.close()
	if err := c.login(); err != nil {
		if !errors.Is(err, io.EOF) && !c.isClosing() {
			c.log.Info("login ended", "err", err)
		}
		return
	}
	c.ffp.Store(true)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		c.writer()
	}()
	if c.srv.cfg.NopInterval > 0 {
		go c.pinger()
	}
	err := c.readLoop()
	if err != nil && !c.isClosing() && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		c.log.Info("connection ended", "session", c.sess.tsih, "err", err)
	}
	if !c.keepIO.Load() {
		// The connection is dead: nobody will read the answers, and a
		// newer connection of the same initiator must not be overtaken
		// by this one's retrying writes.
		c.ioCancel()
	}
	c.close()
	c.abortAll()
	c.execWG.Wait()
	<-writerDone
	c.sess.end()
}

// abandon ends the connection and cancels the backend calls of its
// commands (session reinstatement, an initiator that stopped answering).
func (c *conn) abandon() {
	c.ioCancel()
	c.close()
}

// abortAll cancels every task of the connection (it is going away). Running
// commands finish their backend calls; execWG waits for them.
func (c *conn) abortAll() {
	c.mu.Lock()
	var recv []*task
	for itt, t := range c.tasks {
		t.aborted = true
		delete(c.tasks, itt)
		if !t.running {
			recv = append(recv, t)
		}
	}
	c.mu.Unlock()
	for _, t := range recv {
		c.finishTask(t)
	}
}

// readLoop reads and dispatches PDUs in full feature phase.
func (c *conn) readLoop() error {
	for {
		p := new(pdu.PDU)
		if err := c.rd.ReadHeader(p); err != nil {
			if errors.Is(err, pdu.ErrDataTooLong) {
				c.reject(p, rejectProtocolError)
				c.flushAndClose()
			}
			return err
		}
		c.lastRecv.Store(time.Now().UnixNano())
		if p.BHS.Opcode() == pdu.OpDataOut {
			if err := c.dataOut(p); err != nil {
				c.reject(p, rejectProtocolError)
				c.flushAndClose()
				return err
			}
			continue
		}
		p.Data = make([]byte, p.BHS.DataSegmentLength())
		if err := c.rd.ReadData(p.Data); err != nil {
			if errors.Is(err, pdu.ErrDataDigest) {
				// At error recovery level 0 the command cannot be
				// retried: reject and end the connection.
				c.reject(p, rejectDataDigest)
				c.flushAndClose()
			}
			return err
		}
		if err := c.dispatch(p); err != nil {
			c.reject(p, rejectProtocolError)
			c.flushAndClose()
			return err
		}
	}
}

func (c *conn) dispatch(p *pdu.PDU) error {
	op := p.BHS.Opcode()
	switch op {
	case pdu.OpNopOut:
		c.srv.stats.nopOuts.Add(1)
		if p.BHS.ITT() == reservedTag {
			c.pingReply(p)
			return nil
		}
	case pdu.OpSCSICommand, pdu.OpTaskMgmtReq, pdu.OpTextReq, pdu.OpLogoutReq:
	case pdu.OpSNACKReq:
		c.reject(p, rejectNotSupported)
		return nil
	default:
		c.reject(p, rejectNotSupported)
		return nil
	}
	for _, q := range c.sess.admit(p) {
		if err := c.deliver(q); err != nil {
			return err
		}
	}
	return nil
}

// deliver handles a request whose CmdSN is in order.
func (c *conn) deliver(p *pdu.PDU) error {
	switch p.BHS.Opcode() {
	case pdu.OpSCSICommand:
		if c.sess.discovery {
			c.sess.uncount(p)
			c.reject(p, rejectNotSupported)
			return nil
		}
		if p.BHS.Immediate() && c.sess.tooManyImmediate() {
			c.sess.uncount(p)
			c.reject(p, rejectImmediate)
			return nil
		}
		return c.scsiCommand(p)
	case pdu.OpNopOut:
		c.nopOut(p)
	case pdu.OpTaskMgmtReq:
		c.taskMgmt(p)
	case pdu.OpTextReq:
		return c.textRequest(p)
	case pdu.OpLogoutReq:
		c.logout(p)
	}
	return nil
}

// send queues a PDU for the writer.
func (c *conn) send(o *outPDU) {
	c.wmu.Lock()
	c.queue = append(c.queue, o)
	c.wmu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// flushAndClose lets the writer send what is queued (a Reject), then ends
// the connection.
func (c *conn) flushAndClose() {
	if !c.ffp.Load() {
		c.close()
		return
	}
	c.send(&outPDU{closeAfter: true})
	select {
	case <-c.closing:
	case <-time.After(2 * time.Second):
		c.close()
	}
}

// writer sends queued PDUs, stamping StatSN, ExpCmdSN and MaxCmdSN.
func (c *conn) writer() {
	bw := bufio.NewWriterSize(c.nc, 64<<10)
	var batch []*outPDU
	for {
		select {
		case <-c.wake:
		case <-c.closing:
			return
		}
		for {
			c.wmu.Lock()
			batch, c.queue = c.queue, batch[:0]
			c.wmu.Unlock()
			if len(batch) == 0 {
				break
			}
			for i, o := range batch {
				batch[i] = nil
				if o.p != nil {
					c.stamp(o)
					if err := pdu.Write(bw, o.p, c.params.headerDigest, c.params.dataDigest); err != nil {
						c.close()
						return
					}
				}
				if o.after != nil {
					o.after()
				}
				if o.closeAfter {
					bw.Flush()
					c.close()
					return
				}
			}
			if err := bw.Flush(); err != nil {
				c.close()
				return
			}
		}
	}
}

// stamp fills the sequence numbers of a target PDU at send time.
func (c *conn) stamp(o *outPDU) {
	exp, max := c.sess.window()
	b := &o.p.BHS
	switch {
	case o.status:
		b.SetU32(pdu.OffStatSN, c.statSN)
		c.statSN++
	case !o.keepStatSN:
		b.SetU32(pdu.OffStatSN, c.statSN)
	}
	b.SetU32(pdu.OffExpCmdSN, exp)
	b.SetU32(pdu.OffMaxCmdSN, max)
}

// reject answers a PDU the target cannot accept with a Reject carrying its
// header.
func (c *conn) reject(p *pdu.PDU, reason byte) {
	c.log.Info("rejecting PDU", "opcode", p.BHS.Opcode().String(), "reason", reason)
	r := &pdu.PDU{Data: append([]byte(nil), p.BHS[:]...)}
	r.BHS.SetOpcode(pdu.OpReject)
	r.BHS[1] = 0x80
	r.BHS[2] = reason
	r.BHS.SetITT(reservedTag)
	if c.ffp.Load() {
		c.send(&outPDU{p: r, status: true})
		return
	}
	// During login the reader writes directly.
	_ = pdu.Write(c.nc, r, false, false)
}

// nopOut answers a NOP-Out that expects a reply, echoing its data.
func (c *conn) nopOut(p *pdu.PDU) {
	r := &pdu.PDU{}
	r.BHS.SetOpcode(pdu.OpNopIn)
	r.BHS[1] = 0x80
	copy(r.BHS[8:16], p.BHS[8:16])
	r.BHS.SetITT(p.BHS.ITT())
	r.BHS.SetU32(pdu.OffTTT, reservedTag)
	if len(p.Data) > 0 {
		n := min(len(p.Data), c.params.maxSendData)
		r.Data = p.Data[:n]
	}
	c.send(&outPDU{p: r, status: true})
}

// pingReply handles a NOP-Out with the reserved ITT: the answer to a ping
// of ours, or an initiator ping that wants no reply.
func (c *conn) pingReply(p *pdu.PDU) {
	ttt := p.BHS.U32(pdu.OffTTT)
	c.mu.Lock()
	if ttt != reservedTag && ttt == c.pingTTT {
		c.pingTTT = 0
		c.pingSent = time.Time{}
	}
	c.mu.Unlock()
}

// pinger sends a NOP-In to an initiator that has been silent for
// NopInterval and drops the connection when it stays silent for NopTimeout
// after the ping.
func (c *conn) pinger() {
	interval, timeout := c.srv.cfg.NopInterval, c.srv.cfg.NopTimeout
	tick := max(min(interval, timeout)/4, 10*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-c.closing:
			return
		case now := <-t.C:
			last := time.Unix(0, c.lastRecv.Load())
			c.mu.Lock()
			sent := c.pingSent
			if !sent.IsZero() && last.After(sent) {
				// Traffic proves the initiator alive even if the
				// answer is still on its way.
				c.pingSent, sent = time.Time{}, time.Time{}
				c.pingTTT = 0
			}
			if !sent.IsZero() && now.Sub(sent) > timeout {
				c.mu.Unlock()
				c.srv.stats.dropped.Add(1)
				c.log.Warn("initiator did not answer NOP-In, dropping connection", "session", c.sess.tsih, "waited", now.Sub(sent).String())
				c.abandon()
				return
			}
			var ping *pdu.PDU
			if sent.IsZero() && now.Sub(last) >= interval {
				c.pingTTT = c.newTTTLocked()
				c.pingSent = now
				ping = &pdu.PDU{}
				ping.BHS.SetOpcode(pdu.OpNopIn)
				ping.BHS[1] = 0x80
				ping.BHS.SetITT(reservedTag)
				ping.BHS.SetU32(pdu.OffTTT, c.pingTTT)
			}
			c.mu.Unlock()
			if ping != nil {
				c.srv.stats.pings.Add(1)
				c.send(&outPDU{p: ping})
			}
		}
	}
}

// newTTTLocked returns a fresh target transfer tag.
func (c *conn) newTTTLocked() uint32 {
	for {
		c.nextTTT++
		if c.nextTTT != reservedTag && c.nextTTT != 0 {
			return c.nextTTT
		}
	}
}

// requestLogout asks the initiator to log out (asynchronous event 1) within
// timeout; a connection still logging in is simply closed.
func (c *conn) requestLogout(timeout time.Duration) {
	if !c.ffp.Load() {
		c.close()
		return
	}
	a := &pdu.PDU{}
	a.BHS.SetOpcode(pdu.OpAsyncMessage)
	a.BHS[1] = 0x80
	a.BHS.SetITT(reservedTag)
	a.BHS[36] = 1 // target requests logout
	a.BHS.SetU16(42, uint16(max(timeout/time.Second, 1)))
	c.send(&outPDU{p: a, status: true})
}

// logout answers a Logout Request once the connection's commands have
// completed, then closes the connection.
func (c *conn) logout(p *pdu.PDU) {
	reason := p.BHS.Flags() & 0x7f
	cid := p.BHS.U16(pdu.OffTTT)
	resp := byte(0)
	switch {
	case reason == 2:
		resp = 2 // connection recovery not supported
	case reason == 1 && cid != c.cid:
		resp = 1 // CID not found
	case reason > 2:
		c.reject(p, rejectInvalidPDUField)
		return
	}
	itt := p.BHS.ITT()
	if resp == 0 {
		// Commands still waiting for data-out cannot complete any more;
		// the ones in the backend finish before the response.
		c.abortTasks(func(t *task) bool { return !t.running }, false)
	}
	go func() {
		if resp == 0 {
			c.waitTasks()
		}
		r := &pdu.PDU{}
		r.BHS.SetOpcode(pdu.OpLogoutResp)
		r.BHS[1] = 0x80
		r.BHS[2] = resp
		r.BHS.SetITT(itt)
		c.send(&outPDU{p: r, status: true, closeAfter: resp == 0})
	}()
}

// waitTasks waits until the connection has no task left.
func (c *conn) waitTasks() {
	for {
		c.mu.Lock()
		var d chan struct{}
		for _, t := range c.tasks {
			d = t.done
			break
		}
		c.mu.Unlock()
		if d == nil {
			return
		}
		select {
		case <-d:
		case <-c.closing:
			return
		}
	}
}
