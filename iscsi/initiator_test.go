package iscsi

import (
	"encoding/binary"
	"fmt"
	"net"
	"slices"
	"strconv"
	"testing"
	"time"

	"cairn.io/cairn/iscsi/pdu"
)

// testInitiator is a minimal iSCSI initiator for protocol tests that the
// libiscsi tools cannot express (malformed PDUs, silence, raw sequence
// numbers). It logs in with AuthMethod None straight to full feature phase.
type testInitiator struct {
	t       *testing.T
	nc      net.Conn
	rd      pdu.Reader
	hd, dd  bool
	cmdSN   uint32
	expStat uint32
	itt     uint32
	maxData int
	params  map[string]string
}

func dialInitiator(t *testing.T, addr, target string, extra ...pdu.KV) *testInitiator {
	t.Helper()
	in, rsp, status := tryLogin(t, addr, target, extra...)
	if status != 0 {
		t.Fatalf("login failed with status 0x%04x", status)
	}
	got, err := pdu.ParseText(rsp.Data)
	if err != nil {
		t.Fatal(err)
	}
	in.params = map[string]string{}
	for _, kv := range got {
		in.params[kv.Key] = kv.Value
	}
	in.hd = in.params["HeaderDigest"] == "CRC32C"
	in.dd = in.params["DataDigest"] == "CRC32C"
	in.rd.HeaderDigest, in.rd.DataDigest = in.hd, in.dd
	return in
}

// tryLogin connects and sends a single-step login (security negotiation
// straight to full feature phase) to target ("" for discovery), as
// "iqn.2026-11.io.cairn.test:raw" unless extra names the initiator; it returns
// the initiator, the Login Response and its status class/detail.
func tryLogin(t *testing.T, addr, target string, extra ...pdu.KV) (*testInitiator, *pdu.PDU, uint16) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	in := &testInitiator{t: t, nc: nc, cmdSN: 1, maxData: 8192}
	in.rd.R = nc
	in.rd.MaxData = 1 << 24
	var kvs []pdu.KV
	if !slices.ContainsFunc(extra, func(kv pdu.KV) bool { return kv.Key == "InitiatorName" }) {
		kvs = append(kvs, pdu.KV{Key: "InitiatorName", Value: "iqn.2026-11.io.cairn.test:raw"})
	}
	if target == "" {
		kvs = append(kvs, pdu.KV{Key: "SessionType", Value: "Discovery"})
	} else {
		kvs = append(kvs, pdu.KV{Key: "TargetName", Value: target})
	}
	kvs = append(kvs, extra...)
	rsp, status := in.loginPDU(0x80|1<<2|3, kvs)
	return in, rsp, status
}

// loginPDU sends one Login Request and returns the response and its
// status class/detail.
func (in *testInitiator) loginPDU(flags byte, kvs []pdu.KV) (*pdu.PDU, uint16) {
	in.t.Helper()
	p := &pdu.PDU{Data: pdu.EncodeText(kvs)}
	p.BHS.SetOpcode(pdu.OpLoginReq)
	p.BHS[0] |= 0x40
	p.BHS[1] = flags
	copy(p.BHS[8:14], []byte{0x80, 0, 0, 0x12, 0x34, 0x56})
	p.BHS.SetITT(in.nextITT())
	p.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	p.BHS.SetU32(pdu.OffExpStatSN, in.expStat)
	in.write(p)
	r := in.read()
	if r.BHS.Opcode() != pdu.OpLoginResp {
		in.t.Fatalf("got %s during login", r.BHS.Opcode())
	}
	in.expStat = r.BHS.U32(pdu.OffStatSN) + 1
	return r, uint16(r.BHS[36])<<8 | uint16(r.BHS[37])
}

func (in *testInitiator) nextITT() uint32 { in.itt++; return in.itt }

func (in *testInitiator) write(p *pdu.PDU) {
	in.t.Helper()
	in.nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if err := pdu.Write(in.nc, p, in.hd, in.dd); err != nil {
		in.t.Fatalf("write %s: %v", p.BHS.Opcode(), err)
	}
}

// read returns the next PDU.
func (in *testInitiator) read() *pdu.PDU {
	in.t.Helper()
	p, err := in.tryRead(20 * time.Second)
	if err != nil {
		in.t.Fatalf("read: %v", err)
	}
	return p
}

func (in *testInitiator) tryRead(d time.Duration) (*pdu.PDU, error) {
	in.nc.SetReadDeadline(time.Now().Add(d))
	p := new(pdu.PDU)
	if err := in.rd.Read(p); err != nil {
		return nil, err
	}
	return p, nil
}

// scsiResult is what the initiator learnt about one command.
type scsiResult struct {
	status   byte
	sense    []byte
	data     []byte
	residual uint32
	flags    byte
}

func (r scsiResult) senseKey() (key, asc, ascq byte) {
	s := r.sense
	if len(s) < 14 {
		return 0xff, 0xff, 0xff
	}
	if s[0]&0x7f == 0x72 {
		return s[1] & 0x0f, s[2], s[3]
	}
	return s[2] & 0x0f, s[12], s[13]
}

// command sends a SCSI command with all its data as immediate data (it
// must fit FirstBurstLength) and waits for its completion.
func (in *testInitiator) command(cdb []byte, data []byte, readLen int) scsiResult {
	in.t.Helper()
	itt := in.send(cdb, data, readLen, false)
	return in.wait(itt)
}

// send issues a SCSI command without waiting; it returns the ITT.
func (in *testInitiator) send(cdb []byte, data []byte, readLen int, immediate bool) uint32 {
	in.t.Helper()
	p := &pdu.PDU{Data: data}
	p.BHS.SetOpcode(pdu.OpSCSICommand)
	if immediate {
		p.BHS[0] |= 0x40
	}
	p.BHS[1] = 0x80 | 0x01 // final, simple task
	edtl := len(data)
	if readLen > 0 {
		p.BHS[1] |= cmdRead
		edtl = readLen
	}
	if len(data) > 0 {
		p.BHS[1] |= cmdWrite
	}
	itt := in.nextITT()
	p.BHS.SetITT(itt)
	p.BHS.SetU32(pdu.OffEDTL, uint32(edtl))
	p.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	if !immediate {
		in.cmdSN++
	}
	p.BHS.SetU32(pdu.OffExpStatSN, in.expStat)
	copy(p.BHS[pdu.OffCDB:pdu.OffCDB+16], cdb)
	in.write(p)
	return itt
}

// wait collects Data-In and the status of task itt; responses of other
// tasks are stored for later waits.
func (in *testInitiator) wait(itt uint32) scsiResult {
	in.t.Helper()
	var res scsiResult
	for {
		p := in.read()
		switch p.BHS.Opcode() {
		case pdu.OpNopIn:
			if p.BHS.U32(pdu.OffTTT) != reservedTag {
				in.nopReply(p)
			}
			continue
		case pdu.OpDataIn:
			if p.BHS.ITT() != itt {
				in.t.Fatalf("Data-In for ITT %d while waiting for %d", p.BHS.ITT(), itt)
			}
			off := int(p.BHS.U32(pdu.OffBufferOff))
			if off != len(res.data) {
				in.t.Fatalf("Data-In offset %d, have %d bytes", off, len(res.data))
			}
			res.data = append(res.data, p.Data...)
			if p.BHS[1]&flagStatus != 0 {
				in.expStat = p.BHS.U32(pdu.OffStatSN) + 1
				res.status = p.BHS[3]
				res.flags = p.BHS[1]
				res.residual = p.BHS.U32(pdu.OffResidual)
				return res
			}
		case pdu.OpSCSIResponse:
			if p.BHS.ITT() != itt {
				in.t.Fatalf("response for ITT %d while waiting for %d", p.BHS.ITT(), itt)
			}
			in.expStat = p.BHS.U32(pdu.OffStatSN) + 1
			res.status = p.BHS[3]
			res.flags = p.BHS[1]
			res.residual = p.BHS.U32(pdu.OffResidual)
			if len(p.Data) >= 2 {
				n := int(binary.BigEndian.Uint16(p.Data[0:2]))
				res.sense = p.Data[2 : 2+n]
			}
			return res
		default:
			in.t.Fatalf("unexpected %s while waiting for ITT %d", p.BHS.Opcode(), itt)
		}
	}
}

func (in *testInitiator) nopReply(p *pdu.PDU) {
	r := &pdu.PDU{}
	r.BHS.SetOpcode(pdu.OpNopOut)
	r.BHS[0] |= 0x40
	r.BHS[1] = 0x80
	r.BHS.SetITT(reservedTag)
	r.BHS.SetU32(pdu.OffTTT, p.BHS.U32(pdu.OffTTT))
	r.BHS.SetU32(pdu.OffCmdSN, in.cmdSN)
	r.BHS.SetU32(pdu.OffExpStatSN, in.expStat)
	in.write(r)
}

// clearUA sends TEST UNIT READY until no unit attention is pending.
func (in *testInitiator) clearUA() {
	in.t.Helper()
	for i := 0; i < 10; i++ {
		if r := in.command([]byte{0x00, 0, 0, 0, 0, 0}, nil, 0); r.status == 0 {
			return
		}
	}
	in.t.Fatal("unit attention never cleared")
}

func cdbRead16(lba uint64, blocks uint32) []byte {
	c := make([]byte, 16)
	c[0] = 0x88
	binary.BigEndian.PutUint64(c[2:10], lba)
	binary.BigEndian.PutUint32(c[10:14], blocks)
	return c
}

func cdbWrite16(lba uint64, blocks uint32) []byte {
	c := cdbRead16(lba, blocks)
	c[0] = 0x8a
	return c
}

func cdbReadCapacity16() []byte {
	c := make([]byte, 16)
	c[0] = 0x9e
	c[1] = 0x10
	c[13] = 32
	return c
}

func itoa(n int) string { return strconv.Itoa(n) }

func describe(r scsiResult) string {
	k, a, q := r.senseKey()
	return fmt.Sprintf("status 0x%02x sense %x/%02x/%02x", r.status, k, a, q)
}
