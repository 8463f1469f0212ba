package iscsi

import (
	"cairn.io/cairn/iscsi/pdu"
)

// Task management functions (RFC 7143 section 11.5.1).
const (
	tmfAbortTask        = 1
	tmfAbortTaskSet     = 2
	tmfClearACA         = 3
	tmfClearTaskSet     = 4
	tmfLUNReset         = 5
	tmfTargetWarmReset  = 6
	tmfTargetColdReset  = 7
	tmfTaskReassign     = 8
	tmfRespComplete     = 0
	tmfRespNoTask       = 1
	tmfRespNoLUN        = 2
	tmfRespNoReassign   = 4
	tmfRespNotSupported = 5
)

// abortTasks aborts the connection's tasks that match. Tasks waiting for
// data end at once; running ones end when their backend call returns. With
// status set they answer TASK ABORTED (tasks of other initiators, as with
// TAS=1), otherwise they end silently. It returns channels closed when each
// aborted task is gone.
func (c *conn) abortTasks(match func(*task) bool, status bool) []chan struct{} {
	c.mu.Lock()
	var dones []chan struct{}
	var idle []*task
	for itt, t := range c.tasks {
		if !match(t) {
			continue
		}
		t.aborted = true
		t.abortStatus = status
		delete(c.tasks, itt)
		dones = append(dones, t.done)
		if !t.running {
			idle = append(idle, t)
		}
	}
	c.mu.Unlock()
	for _, t := range idle {
		c.finishTask(t)
	}
	return dones
}

// taskMgmt executes a Task Management Function Request. The response is
// sent once every task it aborted has finished, so no aborted command
// changes the medium after the initiator learns it was aborted.
func (c *conn) taskMgmt(p *pdu.PDU) {
	fn := p.BHS.Flags() & 0x7f
	itt := p.BHS.ITT()
	ref := p.BHS.U32(pdu.OffRefTaskTag)
	refCmdSN := p.BHS.U32(pdu.OffRefCmdSN)
	cmdSN := p.BHS.U32(pdu.OffCmdSN)
	var lunRaw [8]byte
	copy(lunRaw[:], p.BHS[8:16])
	lun, lunOK := decodeLUN(lunRaw)

	respond := func(code byte, after func()) {
		r := &pdu.PDU{}
		r.BHS.SetOpcode(pdu.OpTaskMgmtResp)
		r.BHS[1] = 0x80
		r.BHS[2] = code
		r.BHS.SetITT(itt)
		c.send(&outPDU{p: r, status: true})
		if after != nil {
			after()
		}
	}
	waitThen := func(dones []chan struct{}, fn func()) {
		go func() {
			for _, d := range dones {
				<-d
			}
			fn()
		}()
	}
	t := c.sess.target
	if t == nil {
		respond(tmfRespNotSupported, nil)
		return
	}
	switch fn {
	case tmfAbortTask, tmfAbortTaskSet, tmfClearTaskSet, tmfLUNReset:
		if !lunOK || lun != 0 {
			respond(tmfRespNoLUN, nil)
			return
		}
	}
	switch fn {
	case tmfAbortTask:
		dones := c.abortTasks(func(x *task) bool { return x.itt == ref }, false)
		if len(dones) == 0 {
			// Not here. A command whose CmdSN is still inside the
			// window and before this request was never received: it
			// counts as aborted (RFC 7143 section 11.5.1). Otherwise
			// it completed already or never existed.
			exp, max := c.sess.window()
			inWindow := !serialLess(refCmdSN, exp) && !serialLess(max, refCmdSN)
			if inWindow && serialLess(refCmdSN, cmdSN) {
				respond(tmfRespComplete, nil)
			} else {
				respond(tmfRespNoTask, nil)
			}
			return
		}
		waitThen(dones, func() { respond(tmfRespComplete, nil) })
	case tmfAbortTaskSet:
		dones := c.abortTasks(func(*task) bool { return true }, false)
		waitThen(dones, func() { respond(tmfRespComplete, nil) })
	case tmfClearTaskSet, tmfLUNReset, tmfTargetWarmReset, tmfTargetColdReset:
		var dones []chan struct{}
		for _, ss := range c.srv.sessionsOf(t) {
			other := ss.conn != c
			dones = append(dones, ss.conn.abortTasks(func(*task) bool { return true }, other)...)
		}
		waitThen(dones, func() {
			if fn != tmfClearTaskSet {
				t.lu.Reset()
			}
			var after func()
			if fn == tmfTargetColdReset {
				after = func() {
					for _, ss := range c.srv.sessionsOf(t) {
						if ss.conn == c {
							ss.conn.send(&outPDU{closeAfter: true})
						} else {
							ss.conn.close()
						}
					}
				}
			}
			respond(tmfRespComplete, after)
		})
	case tmfClearACA:
		respond(tmfRespNotSupported, nil)
	case tmfTaskReassign:
		respond(tmfRespNoReassign, nil)
	default:
		respond(tmfRespNotSupported, nil)
	}
}
