package iscsi

import (
	"log/slog"
	"sync"
	"time"

	"cairn.io/cairn/iscsi/pdu"
	"cairn.io/cairn/iscsi/scsi"
)

// session is one iSCSI session. The target allows one connection per
// session (MaxConnections=1), so a session and its connection live and die
// together; the session keeps the command numbering.
type session struct {
	srv           *Server
	conn          *conn
	tsih          uint16
	isid          [6]byte
	initiatorName string
	targetIQN     string
	discovery     bool
	target        *target // nil for discovery sessions
	nexus         *scsi.Nexus
	depth         uint32

	mu        sync.Mutex
	expCmdSN  uint32
	inflight  uint32 // non-immediate SCSI commands not yet completed
	immediate uint32 // immediate SCSI commands not yet completed
	pending   map[uint32]*pdu.PDU
	ended     bool
	endedCh   chan struct{} // closed by end
}

// serialLess compares sequence numbers with RFC 1982 arithmetic.
func serialLess(a, b uint32) bool { return a != b && b-a < 1<<31 }

// window returns ExpCmdSN and MaxCmdSN. The window narrows by one for every
// command in flight, so an initiator never has more than depth commands
// outstanding.
func (s *session) window() (exp, max uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.expCmdSN, s.expCmdSN - 1 + s.depth - s.inflight
}

// admit applies the CmdSN rules (RFC 7143 section 4.2.2.1) to a request
// and returns the requests now deliverable, in order. Immediate requests
// pass at once; a non-immediate one outside [ExpCmdSN, MaxCmdSN] is dropped
// silently; one ahead of ExpCmdSN waits for the gap to fill.
func (s *session) admit(p *pdu.PDU) []*pdu.PDU {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p.BHS.Immediate() {
		if p.BHS.Opcode() == pdu.OpSCSICommand {
			s.immediate++
		}
		return []*pdu.PDU{p}
	}
	cmdSN := p.BHS.U32(pdu.OffCmdSN)
	max := s.expCmdSN - 1 + s.depth - s.inflight
	if serialLess(cmdSN, s.expCmdSN) || serialLess(max, cmdSN) {
		return nil
	}
	if cmdSN != s.expCmdSN {
		if s.pending == nil {
			s.pending = make(map[uint32]*pdu.PDU)
		}
		s.pending[cmdSN] = p
		return nil
	}
	out := []*pdu.PDU{p}
	s.accept(p)
	for {
		q, ok := s.pending[s.expCmdSN]
		if !ok {
			break
		}
		delete(s.pending, s.expCmdSN)
		out = append(out, q)
		s.accept(q)
	}
	return out
}

// accept advances ExpCmdSN past a request; SCSI commands count as in
// flight until they complete.
func (s *session) accept(p *pdu.PDU) {
	s.expCmdSN++
	if p.BHS.Opcode() == pdu.OpSCSICommand {
		s.inflight++
	}
}

// uncount releases the window slot of a non-immediate SCSI command that
// completed (or never ran).
func (s *session) uncount(p *pdu.PDU) {
	if p.BHS.Opcode() != pdu.OpSCSICommand {
		return
	}
	s.mu.Lock()
	if p.BHS.Immediate() {
		s.immediate--
	} else {
		s.inflight--
	}
	s.mu.Unlock()
}

// tooManyImmediate reports whether immediate SCSI commands, which the CmdSN
// window does not bound, exceed the queue depth.
func (s *session) tooManyImmediate() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.immediate > s.depth
}

// end releases what the session holds: the nexus in the logical unit, its
// TSIH and its reference on the target.
func (s *session) end() {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	s.ended = true
	s.mu.Unlock()
	s.srv.unregisterSession(s)
	if s.target != nil {
		s.target.lu.RemoveNexus(s.nexus)
		s.srv.releaseTarget(s.target)
	}
	close(s.endedCh)
}

// reinstateLogInterval is how often a login waiting for a reinstated
// session's commands says so.
const reinstateLogInterval = 10 * time.Second

// waitEnded blocks until the session has ended: its connection's commands
// have all returned from the backend and it released what it holds. It
// logs every reinstateLogInterval while it waits.
func (s *session) waitEnded(log *slog.Logger) {
	t := time.NewTicker(reinstateLogInterval)
	defer t.Stop()
	start := time.Now()
	for {
		select {
		case <-s.endedCh:
			return
		case <-t.C:
			s.mu.Lock()
			n := s.inflight + s.immediate
			s.mu.Unlock()
			log.Warn("still waiting for the commands of the reinstated session to return",
				"old_session", s.tsih, "commands", n, "waited", time.Since(start).Round(time.Second).String())
		}
	}
}
