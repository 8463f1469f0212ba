package iscsi

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"

	"cairn.io/cairn/iscsi/pdu"
	"cairn.io/cairn/iscsi/scsi"
)

// SCSI Command flags (byte 1).
const (
	cmdFinal = 0x80
	cmdRead  = 0x40
	cmdWrite = 0x20
)

// Residual flags of SCSI Response and Data-In (byte 1).
const (
	flagOverflow  = 0x04
	flagUnderflow = 0x02
	flagStatus    = 0x01
)

// task is one SCSI command of a connection. Until it runs, only the reader
// goroutine touches its receive state; aborted and running change under
// conn.mu.
type task struct {
	req       *pdu.PDU
	itt       uint32
	lun       uint64 // decoded LUN
	lunRaw    [8]byte
	cdb       []byte
	edtl      int
	read      bool
	write     bool
	immediate bool

	buf      []byte
	received int

	// Unsolicited data: [len(immediate), unsolEnd), done once the
	// initiator marks its last unsolicited PDU final.
	unsolEnd    int
	unsolNext   int
	unsolDataSN uint32
	unsolDone   bool

	// Solicited data.
	nextR2T int // offset of the next R2T to issue
	r2tSN   uint32
	r2ts    []*r2t

	// dataErr records a Data-Out with an unexpected DataSN: the data is
	// still taken in, then the command fails without running.
	dataErr bool

	// charged is the solicited-data and read buffer memory counted
	// against the connection's budget (bufferLimits.charged); unsol is
	// its unsolicited data buffer; extra is what the unit allocates when
	// the command runs (scsi.DataInLen); runCharged is set once the task
	// made its one charge; waiting marks a task queued for memory;
	// immSlot marks an immediate command holding an immediate data slot.
	charged    int64
	unsol      int64
	extra      int64
	runCharged bool
	waiting    bool
	immSlot    bool

	running bool
	aborted bool
	// abortStatus, when set, makes an aborted task answer TASK ABORTED
	// (tasks of other initiators aborted by a reset).
	abortStatus bool
	done        chan struct{}
}

type r2t struct {
	ttt    uint32
	offset int
	end    int
	next   int
	dataSN uint32
}

// decodeLUN turns the 8-byte SAM LUN structure into a LUN number; ok is
// false for addressing methods the target does not use.
func decodeLUN(b [8]byte) (uint64, bool) {
	for _, x := range b[2:] {
		if x != 0 {
			return 0, false
		}
	}
	switch b[0] >> 6 {
	case 0: // peripheral device addressing
		if b[0]&0x3f != 0 {
			return 0, false
		}
		return uint64(b[1]), true
	case 1: // flat space addressing
		return uint64(b[0]&0x3f)<<8 | uint64(b[1]), true
	}
	return 0, false
}

// scsiCommand starts a task for a SCSI Command PDU.
func (c *conn) scsiCommand(p *pdu.PDU) error {
	b := &p.BHS
	t := &task{
		req:       p,
		itt:       b.ITT(),
		edtl:      int(b.U32(pdu.OffEDTL)),
		read:      b.Flags()&cmdRead != 0,
		write:     b.Flags()&cmdWrite != 0,
		immediate: b.Immediate(),
		done:      make(chan struct{}),
	}
	copy(t.lunRaw[:], b[8:16])
	lun, ok := decodeLUN(t.lunRaw)
	if !ok {
		lun = 0xffff // reported as not supported by the unit
	}
	t.lun = lun
	t.cdb = append([]byte(nil), b[pdu.OffCDB:pdu.OffCDB+16]...)
	if len(p.AHS) > 0 {
		// Extended CDB AHS (type 1): the CDB continues there.
		ahs := p.AHS
		if len(ahs) >= 4 && ahs[2] == 0x01 {
			l := int(binary.BigEndian.Uint16(ahs[0:2]))
			if l >= 1 && 3+l <= len(ahs) {
				t.cdb = append(t.cdb, ahs[4:3+l]...)
			}
		}
	}
	imm := p.Data
	c.mu.Lock()
	if _, dup := c.tasks[t.itt]; dup {
		c.mu.Unlock()
		return fmt.Errorf("%w: initiator task tag 0x%x already in use", errProtocol, t.itt)
	}
	if t.immediate && t.write {
		// Immediate commands are outside the CmdSN window; those that
		// carry data-out take one of a few reserved slots.
		if c.immData >= immediateDataSlots {
			c.mu.Unlock()
			c.sess.uncount(p)
			c.reject(p, rejectImmediate)
			return nil
		}
		c.immData++
		t.immSlot = true
	}
	c.tasks[t.itt] = t
	c.mu.Unlock()

	if !t.write {
		if len(imm) > 0 {
			return fmt.Errorf("%w: immediate data on a command without W bit", errProtocol)
		}
		c.run(t)
		return nil
	}
	if len(imm) > 0 && !c.params.immediateData {
		return fmt.Errorf("%w: immediate data when ImmediateData=No", errProtocol)
	}
	if len(imm) > t.edtl || len(imm) > c.params.firstBurst {
		return fmt.Errorf("%w: %d bytes of immediate data (EDTL %d, FirstBurstLength %d)", errProtocol, len(imm), t.edtl, c.params.firstBurst)
	}
	t.extra = int64(c.sess.target.lu.DataInLen(t.cdb))
	if int64(t.edtl)+t.extra > int64(c.srv.lim.maxData) {
		// Refused before any data moves; unsolicited data for the tag
		// is discarded as it arrives.
		c.completeEarly(t, scsi.Sense{Key: scsi.KeyIllegalRequest, ASC: 0x24})
		return nil
	}
	t.received = len(imm)
	t.unsolNext = len(imm)
	t.unsolEnd = len(imm)
	t.unsolDone = true
	if !c.params.initialR2T && b.Flags()&cmdFinal == 0 {
		t.unsolEnd = min(c.params.firstBurst, t.edtl)
		t.unsolDone = t.unsolEnd <= t.received
	}
	t.nextR2T = t.unsolEnd
	// The buffer holds the unsolicited data (at most FirstBurstLength);
	// it grows to the whole transfer, charged against the session's
	// buffer memory, before the first R2T.
	t.buf = make([]byte, t.unsolEnd)
	copy(t.buf, imm)
	c.mu.Lock()
	defer c.mu.Unlock()
	// Within the reservation by construction: the window and the
	// immediate data slots bound the commands that may carry it.
	t.unsol = int64(t.unsolEnd)
	c.unsolUsed += t.unsol
	c.noteBuffersLocked()
	c.progressLocked(t)
	return nil
}

// progressLocked issues R2Ts the task may have outstanding and runs it once
// all its data is in.
func (c *conn) progressLocked(t *task) {
	if t.aborted || t.running {
		return
	}
	if !t.write || t.received == t.edtl {
		c.runLocked(t)
		return
	}
	if !t.unsolDone {
		return
	}
	if len(t.buf) < t.edtl {
		// The task's one charge: the rest of the transfer and what the
		// unit allocates when it runs.
		if !c.chargeLocked(t, int64(t.edtl-len(t.buf))+t.extra) {
			return
		}
		t.runCharged = true
		nb := make([]byte, t.edtl)
		copy(nb, t.buf[:t.received])
		t.buf = nb
	}
	for len(t.r2ts) < c.params.maxOutstandingR2T && t.nextR2T < t.edtl {
		n := min(c.params.maxBurst, t.edtl-t.nextR2T)
		r := &r2t{ttt: c.newTTTLocked(), offset: t.nextR2T, end: t.nextR2T + n, next: t.nextR2T}
		t.r2ts = append(t.r2ts, r)
		t.nextR2T += n
		p := &pdu.PDU{}
		p.BHS.SetOpcode(pdu.OpR2T)
		p.BHS[1] = 0x80
		copy(p.BHS[8:16], t.lunRaw[:])
		p.BHS.SetITT(t.itt)
		p.BHS.SetU32(pdu.OffTTT, r.ttt)
		p.BHS.SetU32(pdu.OffDataSN, t.r2tSN)
		p.BHS.SetU32(pdu.OffBufferOff, uint32(r.offset))
		p.BHS.SetU32(pdu.OffDesiredLen, uint32(n))
		t.r2tSN++
		c.send(&outPDU{p: p})
	}
}

// dataOut receives a Data-Out PDU straight into its task's buffer.
func (c *conn) dataOut(p *pdu.PDU) error {
	b := &p.BHS
	n := b.DataSegmentLength()
	itt, ttt := b.ITT(), b.U32(pdu.OffTTT)
	off := int(b.U32(pdu.OffBufferOff))
	dataSN := b.U32(pdu.OffDataSN)
	final := b.Final()

	c.mu.Lock()
	t := c.tasks[itt]
	if t == nil || t.running || t.buf == nil {
		c.mu.Unlock()
		// Data for a task that completed or was aborted.
		return c.rd.Discard(n)
	}
	var r *r2t
	if ttt == reservedTag {
		if t.unsolDone || off != t.unsolNext || off+n > t.unsolEnd {
			c.mu.Unlock()
			return fmt.Errorf("%w: unexpected unsolicited Data-Out (offset %d, length %d, DataSN %d)", errProtocol, off, n, dataSN)
		}
		if dataSN != t.unsolDataSN {
			t.dataErr = true
		}
	} else {
		for _, x := range t.r2ts {
			if x.ttt == ttt {
				r = x
			}
		}
		if r == nil || off != r.next || off+n > r.end {
			c.mu.Unlock()
			return fmt.Errorf("%w: unexpected Data-Out (TTT 0x%x, offset %d, length %d, DataSN %d)", errProtocol, ttt, off, n, dataSN)
		}
		if dataSN != r.dataSN {
			t.dataErr = true
		}
	}
	dst := t.buf[off : off+n]
	c.mu.Unlock()

	if err := c.rd.ReadData(dst); err != nil {
		return err
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if t.aborted {
		return nil
	}
	t.received += n
	if r == nil {
		t.unsolNext += n
		t.unsolDataSN++
		if final || t.unsolNext == t.unsolEnd {
			t.unsolDone = true
		}
	} else {
		r.next += n
		r.dataSN++
		if r.next == r.end {
			for i, x := range t.r2ts {
				if x == r {
					t.r2ts = append(t.r2ts[:i], t.r2ts[i+1:]...)
					break
				}
			}
		} else if final {
			return fmt.Errorf("%w: final Data-Out before the end of the R2T's burst", errProtocol)
		}
	}
	c.progressLocked(t)
	return nil
}

// run starts a task whose data is complete.
func (c *conn) run(t *task) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.runLocked(t)
}

func (c *conn) runLocked(t *task) {
	if t.aborted || t.running {
		return
	}
	if !t.runCharged {
		// The task's one charge (unless it made it before its R2Ts):
		// what the unit allocates, the data-in of a read included.
		need := t.extra
		if !t.write {
			need = int64(c.sess.target.lu.DataInLen(t.cdb))
			if need == 0 {
				need = int64(min(t.edtl, smallDataIn))
			}
		}
		if need > c.srv.lim.charged {
			// Cannot happen with a valid config (minSessionBuffer);
			// refuse rather than wait forever.
			t.running = true
			c.execWG.Add(1)
			go func() {
				defer c.execWG.Done()
				c.complete(t, scsi.Response{Status: scsi.StatusCheckCondition,
					Sense: scsi.Sense{Key: scsi.KeyIllegalRequest, ASC: 0x24}.Encode(false)})
			}()
			return
		}
		if need > 0 && !c.chargeLocked(t, need) {
			return
		}
		t.runCharged = true
	}
	t.running = true
	c.execWG.Add(1)
	if t.dataErr {
		// Data-Out PDUs out of sequence (RFC 7143 section 7.1.4.1 leaves
		// no recovery at error recovery level 0): fail the command.
		c.log.Info("Data-Out with unexpected DataSN, failing command", "itt", t.itt)
		go func() {
			defer c.execWG.Done()
			c.complete(t, scsi.Response{Status: scsi.StatusCheckCondition,
				Sense: scsi.Sense{Key: scsi.KeyAbortedCommand, ASC: 0x4b, ASCQ: 0x00}.Encode(false)})
		}()
		return
	}
	c.srv.stats.commands.Add(1)
	go func() {
		defer c.execWG.Done()
		data := t.buf[:t.received]
		resp, ok := c.execute(t, data)
		if !ok {
			resp = scsi.Response{Status: scsi.StatusCheckCondition,
				Sense: scsi.Sense{Key: scsi.KeyHardwareError, ASC: 0x44}.Encode(false)}
		}
		c.complete(t, resp)
	}()
}

// execute runs a command in the unit. A panic there is a bug in the
// command set; it fails this command (INTERNAL TARGET FAILURE) and is
// logged with its stack instead of taking every session down with it.
func (c *conn) execute(t *task, data []byte) (resp scsi.Response, ok bool) {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("panic executing SCSI command", "cdb", fmt.Sprintf("%x", t.cdb), "panic", r, "stack", string(debug.Stack()))
			ok = false
		}
	}()
	return c.sess.target.lu.Execute(c.ioCtx, &scsi.Command{LUN: t.lun, Nexus: c.sess.nexus, CDB: t.cdb, Data: data}), true
}

// completeEarly answers a task with CHECK CONDITION without running it.
func (c *conn) completeEarly(t *task, s scsi.Sense) {
	c.mu.Lock()
	t.running = true
	c.mu.Unlock()
	c.complete(t, scsi.Response{Status: scsi.StatusCheckCondition, Sense: s.Encode(false)})
}

// complete removes a finished task and sends its response unless it was
// aborted. The buffer memory of a response carrying data is released once
// its last PDU is written, so data waiting for a slow initiator stays
// counted.
func (c *conn) complete(t *task, resp scsi.Response) {
	c.mu.Lock()
	aborted := t.aborted
	if c.tasks[t.itt] == t {
		delete(c.tasks, t.itt)
	}
	c.endImmediateLocked(t)
	var release func()
	if !aborted && len(resp.Data) > 0 {
		release = func() {
			c.mu.Lock()
			c.releaseLocked(t)
			c.mu.Unlock()
		}
	} else {
		c.releaseLocked(t)
	}
	c.mu.Unlock()
	c.sess.uncount(t.req)
	switch {
	case !aborted:
		c.respond(t, resp, release)
	case t.abortStatus:
		c.respond(t, scsi.Response{Status: scsi.StatusTaskAborted}, nil)
	}
	close(t.done)
}

// finishTask ends an aborted task that never ran.
func (c *conn) finishTask(t *task) {
	c.mu.Lock()
	c.endImmediateLocked(t)
	c.releaseLocked(t)
	c.mu.Unlock()
	c.sess.uncount(t.req)
	if t.abortStatus {
		c.respond(t, scsi.Response{Status: scsi.StatusTaskAborted}, nil)
	}
	close(t.done)
}

// respond sends the outcome of a task: Data-In PDUs, the last carrying the
// status when it is GOOD (phase collapse), or a SCSI Response. after, when
// set, runs once the last PDU has been written.
func (c *conn) respond(t *task, resp scsi.Response, after func()) {
	data := resp.Data
	var flags byte
	var residual int
	switch {
	case t.read:
		if len(data) > t.edtl {
			flags, residual = flagOverflow, len(data)-t.edtl
			data = data[:t.edtl]
		} else if len(data) < t.edtl {
			flags, residual = flagUnderflow, t.edtl-len(data)
		}
	case t.write:
		if resp.DataOutLen > t.edtl {
			flags, residual = flagOverflow, resp.DataOutLen-t.edtl
		} else if resp.DataOutLen < t.edtl {
			flags, residual = flagUnderflow, t.edtl-resp.DataOutLen
		}
		data = nil
	default:
		if len(data) > 0 {
			flags, residual = flagOverflow, len(data)
		}
		data = nil
	}
	collapse := resp.Status == scsi.StatusGood && len(resp.Sense) == 0 && len(data) > 0
	dataSN := uint32(0)
	for off := 0; off < len(data); {
		n := min(c.params.maxSendData, len(data)-off)
		// Keep Data-In sequences within MaxBurstLength.
		burstEnd := (off/c.params.maxBurst + 1) * c.params.maxBurst
		n = min(n, burstEnd-off)
		last := off+n == len(data)
		p := &pdu.PDU{Data: data[off : off+n]}
		p.BHS.SetOpcode(pdu.OpDataIn)
		if last || off+n == burstEnd {
			p.BHS[1] = 0x80
		}
		p.BHS.SetITT(t.itt)
		p.BHS.SetU32(pdu.OffTTT, reservedTag)
		p.BHS.SetU32(pdu.OffDataSN, dataSN)
		p.BHS.SetU32(pdu.OffBufferOff, uint32(off))
		dataSN++
		off += n
		if last && collapse {
			p.BHS[1] |= flagStatus | flags
			p.BHS[3] = resp.Status
			p.BHS.SetU32(pdu.OffResidual, uint32(residual))
			c.send(&outPDU{p: p, status: true, after: after})
			return
		}
		c.send(&outPDU{p: p, keepStatSN: true})
	}
	p := &pdu.PDU{}
	p.BHS.SetOpcode(pdu.OpSCSIResponse)
	p.BHS[1] = 0x80 | flags
	p.BHS[2] = 0x00 // command completed at target
	p.BHS[3] = resp.Status
	p.BHS.SetITT(t.itt)
	// ExpDataSN: the Data-In PDUs (reads) or R2Ts (writes) sent.
	if t.write && !t.read {
		dataSN = t.r2tSN
	}
	p.BHS.SetU32(pdu.OffDataSN, dataSN)
	p.BHS.SetU32(pdu.OffResidual, uint32(residual))
	if len(resp.Sense) > 0 {
		p.Data = make([]byte, 2+len(resp.Sense))
		binary.BigEndian.PutUint16(p.Data[0:2], uint16(len(resp.Sense)))
		copy(p.Data[2:], resp.Sense)
	}
	c.send(&outPDU{p: p, status: true, after: after})
}

// smallDataIn is what a command other than READ, VERIFY, COMPARE AND
// WRITE, ORWRITE, WRITE SAME and GET LBA STATUS may return at most (INQUIRY,
// MODE SENSE, PERSISTENT RESERVE IN...), charged for its data-in.
const smallDataIn = 64 << 10

// chargeLocked counts n bytes of buffer memory for t against the budget of
// solicited data and read buffers (bufferLimits.charged). When they do not
// fit, t is queued and retried as other commands release memory. A task
// makes one charge in its life, never more than the budget (larger
// commands are refused on arrival), and the tasks holding memory either
// run or wait for data-out the reader takes in without waiting for memory,
// so the queue always drains.
func (c *conn) chargeLocked(t *task, n int64) bool {
	if c.memUsed+n > c.srv.lim.charged {
		if !t.waiting {
			t.waiting = true
			c.memWait = append(c.memWait, t)
		}
		return false
	}
	c.memUsed += n
	t.charged += n
	c.noteBuffersLocked()
	return true
}

// noteBuffersLocked reports the connection's buffer bytes to the testing
// knob.
func (c *conn) noteBuffersLocked() {
	if f := c.srv.cfg.TestingKnobs.OnBufferBytes; f != nil {
		f(c.memUsed + c.unsolUsed)
	}
}

// releaseLocked returns t's memory and retries the commands waiting for it.
func (c *conn) releaseLocked(t *task) {
	c.unsolUsed -= t.unsol
	t.unsol = 0
	if t.charged == 0 {
		return
	}
	c.memUsed -= t.charged
	t.charged = 0
	waiting := c.memWait
	c.memWait = nil
	for _, w := range waiting {
		w.waiting = false
		c.progressLocked(w)
	}
}

// endImmediateLocked frees t's immediate data slot.
func (c *conn) endImmediateLocked(t *task) {
	if t.immSlot {
		t.immSlot = false
		c.immData--
	}
}
