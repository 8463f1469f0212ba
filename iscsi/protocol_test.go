package iscsi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/iscsi/pdu"
)

const tur = "\x00\x00\x00\x00\x00\x00"

func TestResizeRaisesCapacityChangedUnitAttention(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"grow": 8 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("grow"))
	// A fresh nexus first reports POWER ON / RESET.
	r := in.command([]byte(tur), nil, 0)
	if k, a, _ := r.senseKey(); r.status != 2 || k != 6 || a != 0x29 {
		t.Fatalf("first command: %s, want UNIT ATTENTION 29h", describe(r))
	}
	in.clearUA()
	r = in.command(cdbReadCapacity16(), nil, 32)
	if r.status != 0 || len(r.data) != 32 {
		t.Fatalf("READ CAPACITY(16): %s", describe(r))
	}
	if last := beUint64(r.data[0:8]); last != 8<<20/512-1 {
		t.Fatalf("last LBA %d before resize", last)
	}
	if err := tt.exports.volume("grow").Resize(16 << 20); err != nil {
		t.Fatal(err)
	}
	// The unit notices the new size on the next command by itself.
	r = in.command([]byte(tur), nil, 0)
	if k, a, q := r.senseKey(); r.status != 2 || k != 6 || a != 0x2a || q != 0x09 {
		t.Fatalf("after resize: %s, want UNIT ATTENTION CAPACITY DATA HAS CHANGED", describe(r))
	}
	r = in.command(cdbReadCapacity16(), nil, 32)
	if last := beUint64(r.data[0:8]); r.status != 0 || last != 16<<20/512-1 {
		t.Fatalf("after resize: %s, last LBA %d", describe(r), last)
	}
	// NotifyResize raises it at once, and only once per change.
	if err := tt.exports.volume("grow").Resize(24 << 20); err != nil {
		t.Fatal(err)
	}
	tt.srv.NotifyResize("grow")
	r = in.command(cdbReadCapacity16(), nil, 32)
	if k, _, q := r.senseKey(); r.status != 2 || k != 6 || q != 0x09 {
		t.Fatalf("after NotifyResize: %s", describe(r))
	}
	if r = in.command([]byte(tur), nil, 0); r.status != 0 {
		t.Fatalf("second command after resize: %s", describe(r))
	}
}

func beUint64(b []byte) uint64 {
	var v uint64
	for _, x := range b[:8] {
		v = v<<8 | uint64(x)
	}
	return v
}

func TestTargetDropsInitiatorThatIgnoresPings(t *testing.T) {
	tt := startTarget(t, func(c *Config) {
		c.NopInterval = 50 * time.Millisecond
		c.NopTimeout = 300 * time.Millisecond
	}, map[string]int64{"ping": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("ping"))
	// Read without answering: a ping arrives, then the connection ends.
	var sawPing bool
	for {
		p, err := in.tryRead(10 * time.Second)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || isReset(err) {
				break
			}
			t.Fatalf("read: %v (connection should have been dropped)", err)
		}
		if p.BHS.Opcode() == pdu.OpNopIn && p.BHS.U32(pdu.OffTTT) != reservedTag && p.BHS.ITT() == reservedTag {
			sawPing = true
		}
	}
	if !sawPing {
		t.Error("connection dropped without a NOP-In ping first")
	}
	soon.True(t, 5*time.Second, "dead initiator counted and session gone", func() bool {
		st := tt.srv.Stats()
		return st.DeadInitiators == 1 && st.Sessions == 0
	})
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne)
}

// isConnReset reports a connection closed by the peer with unread data.
func isConnReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && !ne.Timeout()
}

func TestAnsweredPingsKeepSessionAlive(t *testing.T) {
	tt := startTarget(t, func(c *Config) {
		c.NopInterval = 30 * time.Millisecond
		c.NopTimeout = 5 * time.Second // generous: a slow answer must not drop the session
	}, map[string]int64{"ping": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("ping"))
	pings := 0
	for pings < 5 {
		p := in.read()
		if p.BHS.Opcode() != pdu.OpNopIn || p.BHS.U32(pdu.OffTTT) == reservedTag {
			t.Fatalf("unexpected %s", p.BHS.Opcode())
		}
		pings++
		in.nopReply(p)
	}
	in.clearUA()
	if st := tt.srv.Stats(); st.DeadInitiators != 0 || st.Pings < 5 {
		t.Fatalf("stats %+v", st)
	}
}

func TestNonImmediateNopOutAdvancesCmdSN(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"nop": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("nop"))
	for i := 0; i < 3; i++ {
		p := &pdu.PDU{Data: []byte("ping-data")}
		p.BHS.SetOpcode(pdu.OpNopOut) // not immediate: consumes a CmdSN
		p.BHS[1] = 0x80
		p.BHS.SetITT(in.nextITT())
		p.BHS.SetU32(pdu.OffTTT, reservedTag)
		p.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
		in.cmdSN++
		in.write(p)
		r := in.read()
		if r.BHS.Opcode() != pdu.OpNopIn || r.BHS.ITT() != p.BHS.ITT() || string(r.Data) != "ping-data" {
			t.Fatalf("NOP-In %s itt %d data %q", r.BHS.Opcode(), r.BHS.ITT(), r.Data)
		}
		if exp := r.BHS.U32(pdu.OffExpCmdSN); exp != in.cmdSN {
			t.Fatalf("ExpCmdSN %d after NOP-Out, want %d", exp, in.cmdSN)
		}
		in.expStat = r.BHS.U32(pdu.OffStatSN) + 1
	}
	in.clearUA() // commands with the following CmdSNs still run
}

func TestCmdSNOutsideWindowIsIgnored(t *testing.T) {
	tt := startTarget(t, func(c *Config) { c.QueueDepth = 4 }, map[string]int64{"win": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("win"))
	in.clearUA()
	// CmdSN beyond MaxCmdSN: silently ignored.
	saved := in.cmdSN
	in.cmdSN = saved + 4
	in.send([]byte(tur), nil, 0, false)
	// CmdSN already used: ignored too.
	in.cmdSN = saved - 1
	in.send([]byte(tur), nil, 0, false)
	in.cmdSN = saved
	itt := in.send([]byte(tur), nil, 0, false)
	r := in.wait(itt) // fails if a response for the ignored ones arrives first
	if r.status != 0 {
		t.Fatalf("in-window command: %s", describe(r))
	}
}

func TestCommandsCompleteOutOfOrder(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"ooo": 1 << 20})
	hold := tt.exports.holdAt("ooo", 0)
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("ooo"))
	in.clearUA()
	slow := in.send(cdbRead16(0, 8), nil, 4096, false)
	<-hold.Entered() // the first read is inside the backend
	fast := in.send(cdbRead16(64, 8), nil, 4096, false)
	r := in.wait(fast) // arrives while the first is still held
	if r.status != 0 || len(r.data) != 4096 {
		t.Fatalf("second read: %s", describe(r))
	}
	hold.Release()
	if r := in.wait(slow); r.status != 0 {
		t.Fatalf("first read: %s", describe(r))
	}
}

func TestDigestsProtectPDUs(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"crc": 4 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("crc"),
		pdu.KV{Key: "HeaderDigest", Value: "CRC32C,None"}, pdu.KV{Key: "DataDigest", Value: "CRC32C,None"})
	if !in.hd || !in.dd {
		t.Fatalf("digests not negotiated: %v", in.params)
	}
	in.clearUA()
	data := bytes.Repeat([]byte("cairn-digest"), 4096/12+1)[:4096]
	if r := in.command(cdbWrite16(8, 8), data, 0); r.status != 0 {
		t.Fatalf("write: %s", describe(r))
	}
	r := in.command(cdbRead16(8, 8), nil, 4096)
	if r.status != 0 || !bytes.Equal(r.data, data) {
		t.Fatalf("read back: %s, equal %v", describe(r), bytes.Equal(r.data, data))
	}
	// A corrupted header digest ends the connection.
	p := &pdu.PDU{}
	p.BHS.SetOpcode(pdu.OpSCSICommand)
	p.BHS[1] = 0x81
	p.BHS.SetITT(in.nextITT())
	p.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	var buf bytes.Buffer
	if err := pdu.Write(&buf, p, true, true); err != nil {
		t.Fatal(err)
	}
	raw := buf.Bytes()
	raw[pdu.BHSLen] ^= 0xff
	in.nc.Write(raw)
	if _, err := in.tryRead(5 * time.Second); err == nil {
		t.Fatal("connection alive after a header digest error")
	}
}

func TestMalformedInputFailsOnlyThatConnection(t *testing.T) {
	tt := startTarget(t, func(c *Config) { c.LoginTimeout = 2 * time.Second }, map[string]int64{"bad": 1 << 20})
	// Garbage instead of a login: its header announces 888 bytes of AHS
	// that never come, so the login deadline ends the connection.
	for _, garbage := range [][]byte{
		bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 100),
		append([]byte{0x1e, 0x80}, make([]byte, 46)...), // not a Login Request
	} {
		nc, err := net.Dial("tcp", tt.addr)
		if err != nil {
			t.Fatal(err)
		}
		nc.Write(garbage)
		nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadAll(nc); err != nil && !isConnReset(err) {
			t.Fatalf("garbage login: connection not closed: %v", err)
		}
		nc.Close()
	}

	in := dialInitiator(t, tt.addr, tt.srv.TargetName("bad"))
	in.clearUA()
	// An unsupported opcode is rejected; the connection goes on.
	p := &pdu.PDU{}
	p.BHS.SetOpcode(0x1c)
	p.BHS[1] = 0x80
	p.BHS.SetITT(in.nextITT())
	in.write(p)
	if r := in.read(); r.BHS.Opcode() != pdu.OpReject || r.BHS[2] != rejectNotSupported {
		t.Fatalf("got %s reason %d, want Reject", r.BHS.Opcode(), r.BHS[2])
	}
	// An unknown SCSI opcode fails that command with sense data.
	r := in.command([]byte{0xd9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil, 0)
	if k, a, _ := r.senseKey(); r.status != 2 || k != 5 || a != 0x20 {
		t.Fatalf("unknown opcode: %s", describe(r))
	}
	// A variable-length CDB (7Fh) on a read is refused the same way.
	if r := in.command([]byte{0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09, 0, 0}, nil, 512); r.status != 2 {
		t.Fatalf("variable-length CDB: %s", describe(r))
	} else if k, a, _ := r.senseKey(); k != 5 || a != 0x20 {
		t.Fatalf("variable-length CDB: %s", describe(r))
	}
	// A CDB field out of range: INVALID FIELD IN CDB.
	bad := cdbRead16(0, 1)
	bad[1] = 0xe0 // RDPROTECT without protection information
	if r := in.command(bad, nil, 512); r.status != 2 {
		t.Fatalf("RDPROTECT: %s", describe(r))
	} else if k, a, _ := r.senseKey(); k != 5 || a != 0x24 {
		t.Fatalf("RDPROTECT: %s", describe(r))
	}
	// LBA past the end: LBA OUT OF RANGE.
	if r := in.command(cdbRead16(1<<20/512, 1), nil, 512); r.status != 2 {
		t.Fatalf("read past end: %s", describe(r))
	} else if k, a, _ := r.senseKey(); k != 5 || a != 0x21 {
		t.Fatalf("read past end: %s", describe(r))
	}
	// A data segment larger than negotiated ends the connection...
	big := &pdu.PDU{Data: make([]byte, 300000)}
	big.BHS.SetOpcode(pdu.OpNopOut)
	big.BHS[0] |= 0x40
	big.BHS[1] = 0x80
	big.BHS.SetITT(in.nextITT())
	in.write(big)
	for {
		p, err := in.tryRead(5 * time.Second)
		if err != nil {
			break
		}
		if p.BHS.Opcode() != pdu.OpReject {
			t.Fatalf("got %s after oversized PDU", p.BHS.Opcode())
		}
	}
	// ...and the target serves the next initiator as before.
	in2 := dialInitiator(t, tt.addr, tt.srv.TargetName("bad"))
	in2.clearUA()
}

func TestSessionReinstatementReplacesOldSession(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"re": 1 << 20})
	a := dialInitiator(t, tt.addr, tt.srv.TargetName("re"))
	a.clearUA()
	b := dialInitiator(t, tt.addr, tt.srv.TargetName("re")) // same name and ISID
	b.clearUA()
	if _, err := a.tryRead(5 * time.Second); err == nil {
		t.Fatal("old session still alive after reinstatement")
	}
	if st := tt.srv.Stats(); st.Sessions != 1 {
		t.Fatalf("%d sessions, want 1", st.Sessions)
	}
}

func TestCloseAsksInitiatorsToLogOut(t *testing.T) {
	tt := startTarget(t, func(c *Config) { c.CloseTimeout = 10 * time.Second }, map[string]int64{"bye": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("bye"))
	in.clearUA()
	done := make(chan struct{})
	go func() { tt.srv.Close(); close(done) }()
	p := in.read()
	if p.BHS.Opcode() != pdu.OpAsyncMessage || p.BHS[36] != 1 {
		t.Fatalf("got %s event %d, want asynchronous logout request", p.BHS.Opcode(), p.BHS[36])
	}
	// Log out as asked.
	lo := &pdu.PDU{}
	lo.BHS.SetOpcode(pdu.OpLogoutReq)
	lo.BHS[0] |= 0x40
	lo.BHS[1] = 0x80
	lo.BHS.SetITT(in.nextITT())
	lo.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	in.write(lo)
	r := in.read()
	if r.BHS.Opcode() != pdu.OpLogoutResp || r.BHS[2] != 0 {
		t.Fatalf("got %s response %d", r.BHS.Opcode(), r.BHS[2])
	}
	<-done
	if !tt.exports.closed("bye") {
		t.Fatal("volume open after Close")
	}
}

func TestAbortTaskWaitsForBackendAndSuppressesResponse(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"abort": 1 << 20})
	hold := tt.exports.holdAt("abort", 4096)
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("abort"))
	in.clearUA()
	victim := in.send(cdbRead16(8, 8), nil, 4096, false)
	<-hold.Entered()
	tmf := &pdu.PDU{}
	tmf.BHS.SetOpcode(pdu.OpTaskMgmtReq)
	tmf.BHS[0] |= 0x40
	tmf.BHS[1] = 0x80 | tmfAbortTask
	tmfITT := in.nextITT()
	tmf.BHS.SetITT(tmfITT)
	tmf.BHS.SetU32(pdu.OffRefTaskTag, victim)
	tmf.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	tmf.BHS.SetU32(pdu.OffRefCmdSN, in.cmdSN-1)
	in.write(tmf)
	// No answer while the backend still holds the command.
	if p, err := in.tryRead(200 * time.Millisecond); err == nil {
		t.Fatalf("got %s before the aborted command left the backend", p.BHS.Opcode())
	}
	hold.Release()
	in.nc.SetReadDeadline(time.Time{})
	p := in.read()
	if p.BHS.Opcode() != pdu.OpTaskMgmtResp || p.BHS.ITT() != tmfITT || p.BHS[2] != tmfRespComplete {
		t.Fatalf("got %s itt %d response %d", p.BHS.Opcode(), p.BHS.ITT(), p.BHS[2])
	}
	// The aborted read sends nothing; the next command's answer is next.
	if r := in.command([]byte(tur), nil, 0); r.status != 0 {
		t.Fatalf("TEST UNIT READY after abort: %s", describe(r))
	}
}

func TestLUNResetRaisesUnitAttention(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"reset": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("reset"))
	in.clearUA()
	tmf := &pdu.PDU{}
	tmf.BHS.SetOpcode(pdu.OpTaskMgmtReq)
	tmf.BHS[0] |= 0x40
	tmf.BHS[1] = 0x80 | tmfLUNReset
	tmf.BHS.SetITT(in.nextITT())
	tmf.BHS.SetU32(pdu.OffRefTaskTag, reservedTag)
	tmf.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	in.write(tmf)
	if p := in.read(); p.BHS.Opcode() != pdu.OpTaskMgmtResp || p.BHS[2] != tmfRespComplete {
		t.Fatalf("LUN RESET: %s response %d", p.BHS.Opcode(), p.BHS[2])
	}
	r := in.command([]byte(tur), nil, 0)
	if k, a, q := r.senseKey(); r.status != 2 || k != 6 || a != 0x29 || q != 0x03 {
		t.Fatalf("after LUN RESET: %s, want BUS DEVICE RESET FUNCTION OCCURRED", describe(r))
	}
}

func TestBackendFailureIsMediumError(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"fail": 1 << 20})
	in := dialInitiator(t, tt.addr, tt.srv.TargetName("fail"))
	in.clearUA()
	tt.exports.volume("fail").SetHook(func(_ context.Context, c *blockdevtest.Call) error {
		if c.Op == blockdevtest.OpRead {
			return errors.New("injected read failure")
		}
		return nil
	})
	r := in.command(cdbRead16(0, 1), nil, 512)
	if k, a, _ := r.senseKey(); r.status != 2 || k != 3 || a != 0x11 {
		t.Fatalf("read with failing backend: %s, want MEDIUM ERROR 11h", describe(r))
	}
	tt.exports.volume("fail").SetHook(nil)
	if r := in.command(cdbRead16(0, 1), nil, 512); r.status != 0 {
		t.Fatalf("read after recovery: %s", describe(r))
	}
}

func TestDropTargetEndsItsSessions(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"gone": 1 << 20, "stay": 1 << 20})
	gone := dialInitiator(t, tt.addr, tt.srv.TargetName("gone"))
	stay := dialInitiator(t, tt.addr, tt.srv.TargetName("stay"))
	gone.clearUA()
	stay.clearUA()
	tt.exports.remove("gone")
	tt.srv.DropTarget("gone")
	if _, err := gone.tryRead(5 * time.Second); err == nil {
		t.Fatal("session of a dropped target still alive")
	}
	stay.clearUA()
	soon.True(t, 5*time.Second, "dropped volume closed", func() bool { return tt.exports.closed("gone") })
}

// TestDropDuringLoginRefusesTheLogin: a login that opened its target just
// before DropTarget removed it is refused with "target removed" (status
// 0204h) instead of starting a session on a deleted volume, and the volume it
// opened is closed.
func TestDropDuringLoginRefusesTheLogin(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"gone": 1 << 20})
	tt.exports.OnOpen(func(_ context.Context, name string) error {
		tt.exports.remove(name)
		tt.srv.DropTarget(name)
		return nil
	})
	_, _, status := tryLogin(t, tt.addr, tt.srv.TargetName("gone"))
	if status != 0x0204 {
		t.Errorf("login racing DropTarget: status 0x%04x, want 0x0204 (target removed)", status)
	}
	soon.True(t, 5*time.Second, "the volume the refused login opened to be closed", func() bool {
		return tt.exports.closed("gone")
	})
	tt.exports.OnOpen(nil)
	if _, _, status := tryLogin(t, tt.addr, tt.srv.TargetName("gone")); status != 0x0203 {
		t.Errorf("login after the drop: status 0x%04x, want 0x0203 (not found)", status)
	}
}

// TestDroppedTargetRefusesRejoin: while a dropped target is still held by
// the command its old session has in the backend, a new login must not
// join it; it opens the volume afresh, which the exports refuse.
func TestDroppedTargetRefusesRejoin(t *testing.T) {
	tt := startTarget(t, nil, map[string]int64{"gone": 1 << 20})
	hold := tt.exports.holdAt("gone", 0)
	old := dialInitiator(t, tt.addr, tt.srv.TargetName("gone"))
	old.clearUA()
	old.send(cdbRead16(0, 1), nil, 512, false)
	<-hold.Entered() // the old session's read holds the target
	tt.exports.remove("gone")
	tt.srv.DropTarget("gone")
	_, _, status := tryLogin(t, tt.addr, tt.srv.TargetName("gone"),
		pdu.KV{Key: "InitiatorName", Value: "iqn.2026-11.io.cairn.test:rejoin"})
	if status != 0x0203 {
		t.Errorf("login to a dropped target: status 0x%04x, want 0x0203 (not found)", status)
	}
	if tt.exports.closed("gone") {
		t.Error("volume closed while a command was still inside it")
	}
	hold.Release()
	soon.True(t, 5*time.Second, "dropped volume closed", func() bool { return tt.exports.closed("gone") })
}

// TestReinstatementWaitsForTheOldSessionsWrites: a login that reinstates a
// session (same initiator name and ISID) cancels the old session's commands
// and does not complete before every one of them has returned from the
// backend, so the old session's write A cannot land after the new
// session's write B to the same block. The old connection is either still
// open or already gone when the new login arrives.
func TestReinstatementWaitsForTheOldSessionsWrites(t *testing.T) {
	for _, oldGone := range []bool{false, true} {
		t.Run(fmt.Sprintf("old connection closed first=%v", oldGone), func(t *testing.T) {
			tt := startTarget(t, nil, map[string]int64{"re": 1 << 20})
			dev := tt.exports.volume("re")
			hold := dev.HoldAt(blockdevtest.OpWrite, 0)
			t.Cleanup(hold.Release) // runs before the target closes, also when the test fails
			a, b := bytes.Repeat([]byte{0xaa}, 4096), bytes.Repeat([]byte{0xbb}, 4096)

			old := dialInitiator(t, tt.addr, tt.srv.TargetName("re"))
			old.clearUA()
			old.send(cdbWrite16(0, 8), a, 0, false)
			<-hold.Entered()
			if oldGone {
				old.nc.Close()
			}

			// Once the new login waits and the old write's context is
			// cancelled, record what the backend has done, then let the
			// old write return (it lands, as in a store that had it in
			// hand).
			type seen struct {
				writes    int64
				cancelled bool
			}
			observed := make(chan seen, 1)
			go func() {
				deadline := time.Now().Add(20 * time.Second)
				for (tt.srv.Stats().Reinstating == 0 || !hold.Cancelled()) && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				observed <- seen{dev.Count(blockdevtest.OpWrite), hold.Cancelled()}
				hold.Release()
			}()
			in := dialInitiator(t, tt.addr, tt.srv.TargetName("re")) // same name and ISID
			select {
			case <-hold.Returned():
			default:
				t.Fatal("the reinstating login completed while the old session's write was inside the backend")
			}
			got := <-observed
			if !got.cancelled || got.writes != 0 {
				t.Fatalf("while the login waited: old write cancelled %v, %d writes performed", got.cancelled, got.writes)
			}
			in.clearUA()
			if r := in.command(cdbWrite16(0, 8), b, 0); r.status != 0 {
				t.Fatalf("new session's write: %s", describe(r))
			}
			if c := dev.Contents(0, 4096); !bytes.Equal(c, b) {
				t.Fatalf("block 0 holds %#x..., want the newer write %#x...", c[0], b[0])
			}
			if st := tt.srv.Stats(); st.Sessions != 1 || st.Reinstating != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}
