package iscsi

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/iscsi/pdu"
	"cairn.io/cairn/iscsi/scsi"
)

// Login stages (CSG/NSG).
const (
	stageSecurity    = 0
	stageOperational = 1
	stageFullFeature = 3
)

// Login status (class, detail) pairs of RFC 7143 section 11.13.5.
type loginStatus struct{ class, detail byte }

var (
	statusInitiatorError   = loginStatus{2, 0x00}
	statusAuthFailure      = loginStatus{2, 0x01}
	statusNotFound         = loginStatus{2, 0x03}
	statusTargetRemoved    = loginStatus{2, 0x04}
	statusBadVersion       = loginStatus{2, 0x05}
	statusMissingParam     = loginStatus{2, 0x07}
	statusBadSessionType   = loginStatus{2, 0x09}
	statusNoSession        = loginStatus{2, 0x0a}
	statusInvalidDuringLog = loginStatus{2, 0x0b}
	statusTargetError      = loginStatus{3, 0x00}
	statusUnavailable      = loginStatus{3, 0x01}
)

// loginError ends a login with a status sent to the initiator.
type loginError struct {
	status loginStatus
	err    error
}

func (e *loginError) Error() string {
	return fmt.Sprintf("login failed (status %02x%02x): %v", e.status.class, e.status.detail, e.err)
}

func (e *loginError) Unwrap() error { return e.err }

func failLogin(s loginStatus, format string, args ...any) error {
	return &loginError{status: s, err: fmt.Errorf(format, args...)}
}

// loginState is what one login phase has learnt so far.
type loginState struct {
	first         bool
	isid          [6]byte
	tsih          uint16
	cid           uint16
	cmdSN         uint32
	stage         byte
	initiatorName string
	targetName    string
	volume        string
	discovery     bool
	authRequired  bool
	secrets       CHAP
	authMethod    string
	authDone      bool
	chap          *chapState
	neg           *negotiator
	pending       []byte // text of a request continued with the C bit
	declared      bool
}

// login runs the login phase on the reader goroutine, answering each Login
// Request directly. On success the connection has a session and its
// negotiated parameters.
func (c *conn) login() error {
	cfg := &c.srv.cfg
	deadline := time.Now().Add(cfg.LoginTimeout)
	c.nc.SetDeadline(deadline)
	st := &loginState{first: true, neg: newNegotiator(cfg)}
	for {
		p := new(pdu.PDU)
		if err := c.rd.Read(p); err != nil {
			return err
		}
		if p.BHS.Opcode() != pdu.OpLoginReq {
			c.reject(p, rejectProtocolError)
			return fmt.Errorf("%w: %s during login", errProtocol, p.BHS.Opcode())
		}
		done, err := c.loginStep(st, p)
		if err != nil {
			var le *loginError
			if errors.As(err, &le) {
				c.loginResponse(p, st, false, 0, nil, le.status)
			}
			return err
		}
		if done {
			c.nc.SetDeadline(time.Time{})
			return nil
		}
	}
}

func (c *conn) loginStep(st *loginState, p *pdu.PDU) (bool, error) {
	cfg := &c.srv.cfg
	b := &p.BHS
	transit := b[1]&0x80 != 0
	cont := b[1]&0x40 != 0
	csg := (b[1] >> 2) & 0x03
	nsg := b[1] & 0x03
	if st.first {
		if b[3] > 0 { // VersionMin
			return false, failLogin(statusBadVersion, "initiator needs iSCSI version %d", b[3])
		}
		copy(st.isid[:], b[8:14])
		st.tsih = b.U16(14)
		st.cid = b.U16(pdu.OffTTT)
		c.statSN = b.U32(pdu.OffExpStatSN)
		if st.tsih != 0 {
			return false, failLogin(statusNoSession, "login to add a connection to session %d: one connection per session", st.tsih)
		}
		st.stage = csg
	} else if csg != st.stage {
		return false, failLogin(statusInvalidDuringLog, "login stage %d, expected %d", csg, st.stage)
	}
	st.cmdSN = b.U32(pdu.OffCmdSN)
	if cont {
		st.pending = append(st.pending, p.Data...)
		if len(st.pending) > 64<<10 {
			return false, failLogin(statusInitiatorError, "login text longer than 64 KiB")
		}
		c.loginResponse(p, st, false, 0, nil, loginStatus{})
		return false, nil
	}
	text := append(st.pending, p.Data...)
	st.pending = nil
	kvs, err := pdu.ParseText(text)
	if err != nil {
		return false, failLogin(statusInitiatorError, "login text: %v", err)
	}
	keys := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		if _, dup := keys[kv.Key]; !dup {
			keys[kv.Key] = kv.Value
		}
	}
	var reply []pdu.KV
	if st.first {
		st.initiatorName = keys["InitiatorName"]
		if st.initiatorName == "" {
			return false, failLogin(statusMissingParam, "no InitiatorName")
		}
		switch keys["SessionType"] {
		case "", "Normal":
			st.targetName = keys["TargetName"]
			if st.targetName == "" {
				return false, failLogin(statusMissingParam, "no TargetName")
			}
			vol, ok := c.srv.volumeOf(st.targetName)
			if !ok {
				return false, failLogin(statusNotFound, "target %q is not under %s", st.targetName, cfg.IQNPrefix)
			}
			st.volume = vol
			st.secrets, st.authRequired = cfg.chapFor(vol)
			reply = append(reply, pdu.KV{Key: "TargetPortalGroupTag", Value: "1"})
		case "Discovery":
			st.discovery = true
			if cfg.DiscoveryCHAP != nil {
				st.secrets, st.authRequired = *cfg.DiscoveryCHAP, true
			}
		default:
			return false, failLogin(statusBadSessionType, "session type %q", keys["SessionType"])
		}
		c.log = c.log.With("initiator", st.initiatorName)
	}
	switch csg {
	case stageSecurity:
		r, err := st.security(keys)
		if err != nil {
			return false, err
		}
		reply = append(reply, r...)
	case stageOperational:
		if st.authRequired && !st.authDone {
			return false, failLogin(statusAuthFailure, "CHAP required, initiator skipped security negotiation")
		}
		if !st.declared {
			st.declared = true
			reply = append(reply, pdu.KV{Key: "MaxRecvDataSegmentLength", Value: strconv.Itoa(cfg.MaxRecvDataSegmentLength)})
		}
	default:
		return false, failLogin(statusInitiatorError, "invalid current stage %d", csg)
	}
	for _, kv := range kvs {
		if r, ok := st.neg.negotiate(kv); ok {
			reply = append(reply, r)
		}
	}
	st.first = false
	if transit && csg == stageSecurity && !st.authDone {
		// Not ready to leave the security stage: answer without T.
		transit = false
	}
	if transit && (nsg <= csg || nsg == 2) {
		return false, failLogin(statusInitiatorError, "invalid transition %d -> %d", csg, nsg)
	}
	if !transit {
		c.loginResponse(p, st, false, 0, reply, loginStatus{})
		return false, nil
	}
	st.stage = nsg
	if nsg != stageFullFeature {
		c.loginResponse(p, st, true, nsg, reply, loginStatus{})
		return false, nil
	}
	if err := c.startSession(st); err != nil {
		return false, err
	}
	c.loginResponse(p, st, true, nsg, reply, loginStatus{})
	// Negotiated digests and lengths apply from the first PDU after the
	// final Login Response.
	c.rd.HeaderDigest = c.params.headerDigest
	c.rd.DataDigest = c.params.dataDigest
	c.log.Info("session started", "target", st.targetName, "session", c.sess.tsih,
		"discovery", st.discovery, "auth", st.authMethod,
		"header_digest", c.params.headerDigest, "data_digest", c.params.dataDigest,
		"max_burst", c.params.maxBurst, "first_burst", c.params.firstBurst,
		"immediate_data", c.params.immediateData, "initial_r2t", c.params.initialR2T)
	return true, nil
}

// security handles the keys of the security negotiation stage.
func (st *loginState) security(keys map[string]string) ([]pdu.KV, error) {
	var reply []pdu.KV
	if am, ok := keys["AuthMethod"]; ok && st.authMethod == "" {
		offered := map[string]bool{}
		for _, m := range strings.Split(am, ",") {
			offered[strings.TrimSpace(m)] = true
		}
		switch {
		case st.authRequired && offered["CHAP"]:
			st.authMethod = "CHAP"
			ch, err := newCHAP(st.secrets)
			if err != nil {
				return nil, failLogin(statusTargetError, "%v", err)
			}
			st.chap = ch
		case st.authRequired:
			return nil, failLogin(statusAuthFailure, "target requires CHAP, initiator offered %q", am)
		case offered["None"]:
			st.authMethod = "None"
			st.authDone = true
		default:
			return nil, failLogin(statusAuthFailure, "target has no CHAP secret, initiator offered %q", am)
		}
		reply = append(reply, pdu.KV{Key: "AuthMethod", Value: st.authMethod})
	}
	if st.authMethod == "" && !st.authRequired {
		// No AuthMethod offered: nothing to authenticate.
		st.authMethod = "None"
		st.authDone = true
	}
	if st.chap != nil && !st.authDone {
		var m map[string]string
		var err error
		switch {
		case keys["CHAP_A"] != "":
			m, err = st.chap.algorithm(keys["CHAP_A"])
			if err == nil {
				reply = append(reply, pdu.KV{Key: "CHAP_A", Value: m["CHAP_A"]},
					pdu.KV{Key: "CHAP_I", Value: m["CHAP_I"]}, pdu.KV{Key: "CHAP_C", Value: m["CHAP_C"]})
			}
		case keys["CHAP_N"] != "" || keys["CHAP_R"] != "":
			m, err = st.chap.verify(keys)
			if err == nil {
				st.authDone = true
				if m != nil {
					reply = append(reply, pdu.KV{Key: "CHAP_N", Value: m["CHAP_N"]}, pdu.KV{Key: "CHAP_R", Value: m["CHAP_R"]})
				}
			}
		}
		if err != nil {
			return nil, &loginError{status: statusAuthFailure, err: err}
		}
	}
	return reply, nil
}

// startSession creates the session at the end of a successful login.
func (c *conn) startSession(st *loginState) error {
	c.params = st.neg.finish()
	c.cid = st.cid
	ss := &session{
		srv:           c.srv,
		conn:          c,
		isid:          st.isid,
		initiatorName: st.initiatorName,
		targetIQN:     st.targetName,
		discovery:     st.discovery,
		depth:         uint32(c.srv.lim.depth),
		expCmdSN:      st.cmdSN,
		ended:         false,
	}
	ss.endedCh = make(chan struct{})
	if !st.discovery {
		ctx, cancel := context.WithTimeout(context.Background(), c.srv.cfg.LoginTimeout)
		t, err := c.srv.acquireTarget(ctx, st.volume)
		cancel()
		if err != nil {
			if errors.Is(err, blockdev.ErrNotFound) {
				return &loginError{status: statusNotFound, err: err}
			}
			if errors.Is(err, ErrServerClosed) {
				return &loginError{status: statusUnavailable, err: err}
			}
			c.log.Error("open target", "volume", st.volume, "err", err)
			return &loginError{status: statusUnavailable, err: err}
		}
		ss.target = t
		isid := hex.EncodeToString(st.isid[:])
		ss.nexus = &scsi.Nexus{
			ID:            st.initiatorName + ",i,0x" + isid,
			InitiatorName: st.initiatorName,
			ISID:          isid,
			RelativePort:  1,
		}
	}
	tsih, old, err := c.srv.registerSession(ss)
	if err != nil {
		c.srv.releaseTarget(ss.target)
		return &loginError{status: statusTargetRemoved, err: err}
	}
	ss.tsih = tsih
	for _, o := range old {
		// Session reinstatement (RFC 7143 section 6.3.5): the old
		// session's connection is ended, the backend calls of its
		// commands are cancelled, and the new session waits for every one
		// of them to return before it reaches full feature phase, so that
		// no write of the old session lands after a write of the new one.
		// There is no time cap: a write that could still land later
		// would be worse than a slow login.
		c.log.Info("reinstating session", "old_session", o.tsih)
		c.srv.stats.reinstating.Add(1)
		o.conn.abandon()
		o.waitEnded(c.log)
		c.srv.stats.reinstating.Add(-1)
		// The wait may outlast the login deadline.
		c.nc.SetDeadline(time.Now().Add(c.srv.cfg.LoginTimeout))
	}
	if ss.target != nil {
		ss.target.lu.AddNexus(ss.nexus)
	}
	c.sess = ss
	return nil
}

// loginResponse sends a Login Response; the reader writes it directly
// because the writer starts only after login.
func (c *conn) loginResponse(req *pdu.PDU, st *loginState, transit bool, nsg byte, kvs []pdu.KV, status loginStatus) {
	r := &pdu.PDU{Data: pdu.EncodeText(kvs)}
	r.BHS.SetOpcode(pdu.OpLoginResp)
	csg := (req.BHS[1] >> 2) & 0x03
	r.BHS[1] = csg << 2
	if transit {
		r.BHS[1] |= 0x80 | nsg
	}
	copy(r.BHS[8:14], req.BHS[8:14])
	if c.sess != nil && status.class == 0 {
		r.BHS.SetU16(14, c.sess.tsih)
	}
	r.BHS.SetITT(req.BHS.ITT())
	r.BHS.SetU32(pdu.OffStatSN, c.statSN)
	c.statSN++
	r.BHS.SetU32(pdu.OffExpCmdSN, st.cmdSN)
	r.BHS.SetU32(pdu.OffMaxCmdSN, st.cmdSN+uint32(c.srv.lim.depth)-1)
	r.BHS[36] = status.class
	r.BHS[37] = status.detail
	if err := pdu.Write(c.nc, r, false, false); err != nil {
		c.close()
	}
}
