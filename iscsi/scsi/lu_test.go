package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"cairn.io/cairn/blockdev/blockdevtest"
)

var errBackend = errors.New("backend failure")

var bg = context.Background()

func newMem(size int) *blockdevtest.Device { return blockdevtest.New(int64(size)) }

// failAll makes every later call of be fail.
func failAll(be *blockdevtest.Device) {
	be.SetHook(func(context.Context, *blockdevtest.Call) error { return errBackend })
}

func newUnit(t testing.TB, size int) (*LogicalUnit, *blockdevtest.Device) {
	t.Helper()
	be := newMem(size)
	lu, err := New(Config{Backend: be, Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	return lu, be
}

var nexA = &Nexus{ID: "iqn.a,i,0x01", InitiatorName: "iqn.a", ISID: "01", RelativePort: 1}
var nexB = &Nexus{ID: "iqn.b,i,0x02", InitiatorName: "iqn.b", ISID: "02", RelativePort: 1}

func attach(lu *LogicalUnit, n *Nexus) {
	lu.AddNexus(n)
	lu.Execute(bg, &Command{Nexus: n, CDB: []byte{0, 0, 0, 0, 0, 0}}) // consume power-on UA
}

func senseOf(r Response) (key, asc, ascq byte) {
	s := r.Sense
	if len(s) < 14 {
		if len(s) >= 4 && s[0] == 0x72 {
			return s[1], s[2], s[3]
		}
		return 0xff, 0xff, 0xff
	}
	if s[0]&0x7f == 0x72 {
		return s[1], s[2], s[3]
	}
	return s[2] & 0x0f, s[12], s[13]
}

func expectSense(t *testing.T, what string, r Response, key, asc, ascq byte) {
	t.Helper()
	k, a, q := senseOf(r)
	if r.Status != StatusCheckCondition || k != key || a != asc || q != ascq {
		t.Fatalf("%s: status %#x sense %x/%02x/%02x, want CHECK CONDITION %x/%02x/%02x", what, r.Status, k, a, q, key, asc, ascq)
	}
}

func expectGood(t *testing.T, what string, r Response) {
	t.Helper()
	if r.Status != StatusGood {
		k, a, q := senseOf(r)
		t.Fatalf("%s: status %#x sense %x/%02x/%02x", what, r.Status, k, a, q)
	}
}

func cdb16(op byte, lba uint64, n uint32, flags byte) []byte {
	c := make([]byte, 16)
	c[0], c[1] = op, flags
	binary.BigEndian.PutUint64(c[2:10], lba)
	binary.BigEndian.PutUint32(c[10:14], n)
	return c
}

func caw(lba uint64, n byte) []byte {
	c := make([]byte, 16)
	c[0] = opCompareAndWrite
	binary.BigEndian.PutUint64(c[2:10], lba)
	c[13] = n
	return c
}

func TestReadWriteAndFUA(t *testing.T) {
	lu, be := newUnit(t, 1<<20)
	attach(lu, nexA)
	data := bytes.Repeat([]byte{0x5a}, 4096)
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opWrite16, 16, 8, 0x08), Data: data})
	expectGood(t, "WRITE(16) FUA", r)
	if r.DataOutLen != 4096 {
		t.Fatalf("DataOutLen %d", r.DataOutLen)
	}
	if be.Count(blockdevtest.OpFlush) != 1 {
		t.Fatalf("FUA write flushed %d times", be.Count(blockdevtest.OpFlush))
	}
	r = lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 16, 8, 0)})
	expectGood(t, "READ(16)", r)
	if !bytes.Equal(r.Data, data) {
		t.Fatal("read back differs")
	}
	// READ(10), READ(6) address the same blocks.
	r = lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opRead10, 0, 0, 0, 0, 16, 0, 0, 8, 0}})
	if !bytes.Equal(r.Data, data) {
		t.Fatal("READ(10) differs")
	}
	r = lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opRead6, 0, 0, 16, 8, 0}})
	if !bytes.Equal(r.Data, data) {
		t.Fatal("READ(6) differs")
	}
	expectGood(t, "SYNCHRONIZE CACHE(10)", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opSyncCache10, 0, 0, 0, 0, 0, 0, 0, 0, 0}}))
	if be.Count(blockdevtest.OpFlush) != 2 {
		t.Fatal("SYNCHRONIZE CACHE did not flush")
	}
}

func TestErrorsCarrySenseData(t *testing.T) {
	lu, be := newUnit(t, 1<<20)
	attach(lu, nexA)
	blocks := uint64(1 << 20 / 512)
	expectSense(t, "read past end", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, blocks-1, 2, 0)}), KeyIllegalRequest, 0x21, 0)
	expectSense(t, "0 blocks beyond end", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, blocks+1, 0, 0)}), KeyIllegalRequest, 0x21, 0)
	expectSense(t, "LBA 2^64-1", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opWrite16, ^uint64(0), 1, 0), Data: make([]byte, 512)}), KeyIllegalRequest, 0x21, 0)
	expectSense(t, "RDPROTECT", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 0, 1, 0x20)}), KeyIllegalRequest, 0x24, 0)
	expectSense(t, "unknown opcode", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{0xc5, 0, 0, 0, 0, 0}}), KeyIllegalRequest, 0x20, 0)
	expectSense(t, "short CDB", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opRead16, 0}}), KeyIllegalRequest, 0x24, 0)
	expectSense(t, "other LUN", lu.Execute(bg, &Command{LUN: 3, Nexus: nexA, CDB: cdb16(opRead16, 0, 1, 0)}), KeyIllegalRequest, 0x25, 0)
	small, err := New(Config{Backend: be, Name: "small", MaxTransferBlocks: 8})
	if err != nil {
		t.Fatal(err)
	}
	attach(small, nexA)
	expectSense(t, "over max transfer", small.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 0, 9, 0)}), KeyIllegalRequest, 0x24, 0)
	expectGood(t, "at max transfer", small.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 0, 8, 0)}))
	failAll(be)
	expectSense(t, "failing read", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 0, 1, 0)}), KeyMediumError, 0x11, 0)
	expectSense(t, "failing write", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opWrite16, 0, 1, 0), Data: make([]byte, 512)}), KeyMediumError, 0x0c, 0)
	expectSense(t, "failing flush", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opSyncCache10, 0, 0, 0, 0, 0, 0, 0, 0, 0}}), KeyMediumError, 0x0c, 0)
}

// TestCompareAndWriteIsAtomic runs concurrent read-increment-CAW loops on
// one block, with plain writes to the neighbouring blocks in between: if a
// COMPARE AND WRITE were not atomic, increments would be lost.
func TestCompareAndWriteIsAtomic(t *testing.T) {
	lu, _ := newUnit(t, 1<<20)
	const workers, rounds = 8, 50
	var wg sync.WaitGroup
	var attempts atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			n := &Nexus{ID: string(rune('a' + w))}
			attach(lu, n)
			for i := 0; i < rounds; {
				attempts.Add(1)
				cur := lu.Execute(bg, &Command{Nexus: n, CDB: cdb16(opRead16, 0, 2, 0)}).Data
				next := append([]byte(nil), cur...)
				binary.BigEndian.PutUint64(next, binary.BigEndian.Uint64(cur)+1)
				r := lu.Execute(bg, &Command{Nexus: n, CDB: caw(0, 2), Data: append(cur, next...)})
				switch r.Status {
				case StatusGood:
					i++
				case StatusCheckCondition:
					if k, _, _ := senseOf(r); k != KeyMiscompare {
						t.Errorf("CAW: sense key %x", k)
						return
					}
				}
				lu.Execute(bg, &Command{Nexus: n, CDB: cdb16(opWrite16, 1, 1, 0), Data: next[:512]})
			}
		}(w)
	}
	wg.Wait()
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 0, 1, 0)})
	if got := binary.BigEndian.Uint64(r.Data); got != workers*rounds {
		t.Fatalf("counter %d after %d successful COMPARE AND WRITEs (%d attempts)", got, workers*rounds, attempts.Load())
	}
}

func TestCompareAndWriteMiscompareReportsOffset(t *testing.T) {
	lu, _ := newUnit(t, 1<<20)
	attach(lu, nexA)
	cur := make([]byte, 1024)
	verify := append([]byte(nil), cur...)
	verify[700] = 1
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: caw(4, 2), Data: append(verify, bytes.Repeat([]byte{9}, 1024)...)})
	expectSense(t, "miscompare", r, KeyMiscompare, 0x1d, 0)
	if r.Sense[0]&0x80 == 0 || binary.BigEndian.Uint32(r.Sense[3:7]) != 700 {
		t.Fatalf("information field %x, want valid 700", r.Sense[:7])
	}
	if d := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opRead16, 4, 2, 0)}).Data; !bytes.Equal(d, cur) {
		t.Fatal("miscompare wrote data")
	}
	// Data-out of the wrong size is refused.
	expectSense(t, "short data-out", lu.Execute(bg, &Command{Nexus: nexA, CDB: caw(4, 2), Data: make([]byte, 1024)}), KeyIllegalRequest, 0x24, 0)
}

func TestUnmapAndWriteSame(t *testing.T) {
	lu, be := newUnit(t, 1<<20)
	attach(lu, nexA)
	ones := bytes.Repeat([]byte{0xff}, 8192)
	expectGood(t, "write", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opWrite16, 0, 16, 0), Data: ones}))
	param := make([]byte, 24)
	binary.BigEndian.PutUint16(param[0:2], 22)
	binary.BigEndian.PutUint16(param[2:4], 16)
	binary.BigEndian.PutUint64(param[8:16], 2)
	binary.BigEndian.PutUint32(param[16:20], 3)
	expectGood(t, "UNMAP", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, Data: param}))
	if !allZero(be.Contents(2*512, 3*512)) || be.Contents(5*512, 1)[0] != 0xff || be.Contents(2*512-1, 1)[0] != 0xff {
		t.Fatal("UNMAP cleared the wrong blocks")
	}
	binary.BigEndian.PutUint64(param[8:16], 1<<20/512-1)
	expectSense(t, "UNMAP past end", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 24, 0}, Data: param}), KeyIllegalRequest, 0x21, 0)
	// WRITE SAME(16) replicates its block.
	pattern := bytes.Repeat([]byte("ab"), 256)
	ws := cdb16(opWriteSame16, 100, 10, 0)
	expectGood(t, "WRITE SAME(16)", lu.Execute(bg, &Command{Nexus: nexA, CDB: ws, Data: pattern}))
	for i := 100; i < 110; i++ {
		if !bytes.Equal(be.Contents(int64(i)*512, 512), pattern) {
			t.Fatalf("block %d not written by WRITE SAME", i)
		}
	}
	// With UNMAP set the blocks are deallocated and read as zeros.
	ws[1] = 0x08
	expectGood(t, "WRITE SAME(16) UNMAP", lu.Execute(bg, &Command{Nexus: nexA, CDB: ws, Data: pattern}))
	if !allZero(be.Contents(100*512, 10*512)) {
		t.Fatal("WRITE SAME with UNMAP left data")
	}
	expectSense(t, "WRITE SAME wrong data size", lu.Execute(bg, &Command{Nexus: nexA, CDB: ws, Data: pattern[:100]}), KeyIllegalRequest, 0x24, 0)
	// GET LBA STATUS reports the zeroed extent as deallocated.
	gls := cdb16(opServiceActionIn16, 100, 24, saGetLBAStatus)
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: gls})
	expectGood(t, "GET LBA STATUS", r)
	if binary.BigEndian.Uint64(r.Data[8:16]) != 100 || r.Data[20] != 1 {
		t.Fatalf("GET LBA STATUS descriptor %x", r.Data[8:24])
	}
}

func TestCapacityChangeRaisesUnitAttentionOnEveryNexus(t *testing.T) {
	lu, be := newUnit(t, 1<<20)
	attach(lu, nexA)
	attach(lu, nexB)
	if err := be.Resize(be.Size() + 1<<20); err != nil {
		t.Fatal(err)
	}
	tur := []byte{0, 0, 0, 0, 0, 0}
	for _, n := range []*Nexus{nexA, nexB} {
		expectSense(t, "after growth", lu.Execute(bg, &Command{Nexus: n, CDB: tur}), KeyUnitAttention, 0x2a, 0x09)
		expectGood(t, "then", lu.Execute(bg, &Command{Nexus: n, CDB: tur}))
	}
	// INQUIRY does not consume a pending unit attention.
	if err := be.Resize(be.Size() + 1<<20); err != nil {
		t.Fatal(err)
	}
	lu.NotifyResize()
	expectGood(t, "INQUIRY", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opInquiry, 0, 0, 0, 96, 0}}))
	expectSense(t, "TUR", lu.Execute(bg, &Command{Nexus: nexA, CDB: tur}), KeyUnitAttention, 0x2a, 0x09)
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opServiceActionIn16, 0, 32, saReadCapacity16)})
	if last := binary.BigEndian.Uint64(r.Data[0:8]); last != 3<<20/512-1 {
		t.Fatalf("capacity after growth: last LBA %d", last)
	}
}

func proutCDB(sa, typ byte) []byte {
	return []byte{opPersistReserveOut, sa, typ, 0, 0, 0, 0, 0, 24, 0}
}

func proutData(key, saKey uint64) []byte {
	d := make([]byte, 24)
	binary.BigEndian.PutUint64(d[0:8], key)
	binary.BigEndian.PutUint64(d[8:16], saKey)
	return d
}

func TestPersistentReservations(t *testing.T) {
	lu, _ := newUnit(t, 1<<20)
	attach(lu, nexA)
	attach(lu, nexB)
	write := func(n *Nexus) Response {
		return lu.Execute(bg, &Command{Nexus: n, CDB: cdb16(opWrite16, 1, 1, 0), Data: make([]byte, 512)})
	}
	read := func(n *Nexus) Response { return lu.Execute(bg, &Command{Nexus: n, CDB: cdb16(opRead16, 1, 1, 0)}) }
	expectGood(t, "register A", lu.Execute(bg, &Command{Nexus: nexA, CDB: proutCDB(0, 0), Data: proutData(0, 0xa)}))
	expectGood(t, "register B", lu.Execute(bg, &Command{Nexus: nexB, CDB: proutCDB(0, 0), Data: proutData(0, 0xb)}))
	// Registering again with a wrong key conflicts.
	if r := lu.Execute(bg, &Command{Nexus: nexA, CDB: proutCDB(0, 0), Data: proutData(0x99, 0xc)}); r.Status != StatusReservationConflict {
		t.Fatalf("register with wrong key: %#x", r.Status)
	}
	expectGood(t, "A reserves WE", lu.Execute(bg, &Command{Nexus: nexA, CDB: proutCDB(1, prWriteExclusive), Data: proutData(0xa, 0)}))
	expectGood(t, "A writes", write(nexA))
	if r := write(nexB); r.Status != StatusReservationConflict {
		t.Fatalf("B writes under A's WRITE EXCLUSIVE: %#x", r.Status)
	}
	expectGood(t, "B reads", read(nexB))
	// READ KEYS and READ RESERVATION.
	r := lu.Execute(bg, &Command{Nexus: nexB, CDB: []byte{opPersistReserveIn, 0, 0, 0, 0, 0, 0, 0, 255, 0}})
	if binary.BigEndian.Uint32(r.Data[4:8]) != 16 || binary.BigEndian.Uint64(r.Data[8:16]) != 0xa || binary.BigEndian.Uint64(r.Data[16:24]) != 0xb {
		t.Fatalf("READ KEYS %x", r.Data)
	}
	r = lu.Execute(bg, &Command{Nexus: nexB, CDB: []byte{opPersistReserveIn, 1, 0, 0, 0, 0, 0, 0, 255, 0}})
	if binary.BigEndian.Uint64(r.Data[8:16]) != 0xa || r.Data[21] != prWriteExclusive {
		t.Fatalf("READ RESERVATION %x", r.Data)
	}
	// B preempts A: A's registration goes, B holds EXCLUSIVE ACCESS.
	expectGood(t, "B preempts", lu.Execute(bg, &Command{Nexus: nexB, CDB: proutCDB(4, prExclusiveAccess), Data: proutData(0xb, 0xa)}))
	expectSense(t, "A learns of the preemption", read(nexA), KeyUnitAttention, 0x2a, 0x05)
	if r := read(nexA); r.Status != StatusReservationConflict {
		t.Fatalf("A reads under B's EXCLUSIVE ACCESS: %#x", r.Status)
	}
	// RESERVE(6) conflicts with the persistent reservation.
	if r := lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opReserve6, 0, 0, 0, 0, 0}}); r.Status != StatusReservationConflict {
		t.Fatalf("RESERVE(6) under a PR: %#x", r.Status)
	}
	expectGood(t, "B clears", lu.Execute(bg, &Command{Nexus: nexB, CDB: proutCDB(3, 0), Data: proutData(0xb, 0)}))
	expectGood(t, "A writes again", write(nexA))
	// APTPL is not supported.
	d := proutData(0, 0xa)
	d[20] = 0x01
	expectSense(t, "APTPL", lu.Execute(bg, &Command{Nexus: nexA, CDB: proutCDB(0, 0), Data: d}), KeyIllegalRequest, 0x26, 0)
}

func TestReserve6(t *testing.T) {
	lu, _ := newUnit(t, 1<<20)
	attach(lu, nexA)
	attach(lu, nexB)
	res := []byte{opReserve6, 0, 0, 0, 0, 0}
	rel := []byte{opRelease6, 0, 0, 0, 0, 0}
	expectGood(t, "A reserves", lu.Execute(bg, &Command{Nexus: nexA, CDB: res}))
	if r := lu.Execute(bg, &Command{Nexus: nexB, CDB: cdb16(opRead16, 0, 1, 0)}); r.Status != StatusReservationConflict {
		t.Fatalf("B reads under A's RESERVE(6): %#x", r.Status)
	}
	expectGood(t, "B release is a no-op", lu.Execute(bg, &Command{Nexus: nexB, CDB: rel}))
	expectGood(t, "B INQUIRY", lu.Execute(bg, &Command{Nexus: nexB, CDB: []byte{opInquiry, 0, 0, 0, 36, 0}}))
	lu.RemoveNexus(nexA) // nexus loss releases it
	expectGood(t, "B reserves", lu.Execute(bg, &Command{Nexus: nexB, CDB: res}))
}

func TestModeSelectDescriptorSenseAndWriteProtect(t *testing.T) {
	lu, _ := newUnit(t, 1<<20)
	attach(lu, nexA)
	attach(lu, nexB)
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opModeSense6, 0x08, pageControl, 0, 255, 0}})
	expectGood(t, "MODE SENSE control", r)
	page := append([]byte(nil), r.Data[4:]...)
	page[2] |= 0x04 // D_SENSE
	page[4] |= 0x08 // SWP
	sel := append([]byte{0, 0, 0, 0}, page...)
	expectGood(t, "MODE SELECT", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opModeSelect6, 0x10, 0, 0, byte(len(sel)), 0}, Data: sel}))
	r = lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opWrite16, 0, 1, 0), Data: make([]byte, 512)})
	if r.Status != StatusCheckCondition || r.Sense[0] != 0x72 || r.Sense[1] != KeyDataProtect {
		t.Fatalf("write under SWP with D_SENSE: %#x %x", r.Status, r.Sense)
	}
	// The other nexus is told the parameters changed.
	expectSense(t, "other nexus", lu.Execute(bg, &Command{Nexus: nexB, CDB: []byte{0, 0, 0, 0, 0, 0}}), KeyUnitAttention, 0x2a, 0x01)
	// Changing a bit that is not changeable is refused.
	bad := append([]byte(nil), sel...)
	bad[4+3] ^= 0x80
	expectSense(t, "unchangeable bit", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opModeSelect6, 0x10, 0, 0, byte(len(bad)), 0}, Data: bad}), KeyIllegalRequest, 0x26, 0)
}

func TestReportSupportedOpcodesListsEveryCommand(t *testing.T) {
	lu, _ := newUnit(t, 1<<20)
	attach(lu, nexA)
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opMaintenanceIn, saReportOpcodes, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0}})
	expectGood(t, "REPORT SUPPORTED OPERATION CODES", r)
	if n := int(binary.BigEndian.Uint32(r.Data[0:4])) / 8; n != len(supportedOps) {
		t.Fatalf("%d descriptors, want %d", n, len(supportedOps))
	}
	// Every listed command is really implemented: none answers INVALID
	// COMMAND OPERATION CODE.
	for _, o := range supportedOps {
		cdb := make([]byte, len(o.usage))
		cdb[0] = o.usage[0]
		if o.hasSA {
			cdb[1] = byte(o.sa)
		}
		r := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb})
		if k, a, _ := senseOf(r); r.Status == StatusCheckCondition && k == KeyIllegalRequest && a == 0x20 {
			t.Errorf("opcode %#x/%#x listed but not implemented", o.usage[0], o.sa)
		}
	}
}

// sksField returns the sense-key specific field pointer of fixed or
// descriptor sense data: valid, C/D and the byte it points at.
func sksField(t *testing.T, sense []byte) (valid, cdb bool, field uint16) {
	t.Helper()
	if sense[0]&0x7f == 0x72 {
		for d := sense[8:]; len(d) >= 2; d = d[2+int(d[1]):] {
			if d[0] == 0x02 && len(d) >= 8 {
				return d[4]&0x80 != 0, d[4]&0x40 != 0, binary.BigEndian.Uint16(d[5:7])
			}
		}
		return false, false, 0
	}
	if len(sense) < 18 {
		t.Fatalf("fixed sense data of %d bytes", len(sense))
	}
	return sense[15]&0x80 != 0, sense[15]&0x40 != 0, binary.BigEndian.Uint16(sense[16:18])
}

func writeSame10(lba uint32, n uint16, flags byte) []byte {
	c := make([]byte, 10)
	c[0], c[1] = opWriteSame10, flags
	binary.BigEndian.PutUint32(c[2:6], lba)
	binary.BigEndian.PutUint16(c[7:9], n)
	return c
}

// TestWriteSameLengthIsBounded checks that WRITE SAME of zero blocks (which
// would otherwise mean "to the end of the medium") and WRITE SAME longer
// than the MAXIMUM WRITE SAME LENGTH are refused with INVALID FIELD IN CDB
// pointing at the NUMBER OF LOGICAL BLOCKS field, without touching the
// backend, and that the block limits page advertises WSNZ and the maximum.
func TestWriteSameLengthIsBounded(t *testing.T) {
	const size = 64 << 20 // larger than one maximal WRITE SAME
	be := newMem(size)
	lu, err := New(Config{Backend: be, Name: "ws"})
	if err != nil {
		t.Fatal(err)
	}
	attach(lu, nexA)
	maxBlocks := uint32(MaxWriteSameBytes / 512)

	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opInquiry, 0x01, 0xb0, 0, 0xff, 0}})
	expectGood(t, "INQUIRY block limits", r)
	if r.Data[4]&0x01 == 0 {
		t.Fatal("block limits page does not set WSNZ")
	}
	if got := binary.BigEndian.Uint64(r.Data[36:44]); got != uint64(maxBlocks) {
		t.Fatalf("MAXIMUM WRITE SAME LENGTH %d, want %d", got, maxBlocks)
	}

	block := bytes.Repeat([]byte{0xa5}, 512)
	for _, tc := range []struct {
		name  string
		cdb   []byte
		data  []byte
		field uint16
	}{
		{"WRITE SAME(10) 0 blocks", writeSame10(0, 0, 0), block, 7},
		{"WRITE SAME(10) 0 blocks UNMAP", writeSame10(0, 0, 0x08), block, 7},
		{"WRITE SAME(16) 0 blocks", cdb16(opWriteSame16, 0, 0, 0), block, 10},
		{"WRITE SAME(16) 0 blocks UNMAP", cdb16(opWriteSame16, 0, 0, 0x08), block, 10},
		{"WRITE SAME(16) 0 blocks NDOB", cdb16(opWriteSame16, 0, 0, 0x01), nil, 10},
		{"WRITE SAME(16) over the maximum", cdb16(opWriteSame16, 0, maxBlocks+1, 0), block, 10},
		{"WRITE SAME(16) over the maximum UNMAP", cdb16(opWriteSame16, 0, maxBlocks+1, 0x08), block, 10},
	} {
		r := lu.Execute(bg, &Command{Nexus: nexA, CDB: tc.cdb, Data: tc.data})
		expectSense(t, tc.name, r, KeyIllegalRequest, 0x24, 0)
		valid, cd, field := sksField(t, r.Sense)
		if !valid || !cd || field != tc.field {
			t.Fatalf("%s: field pointer valid=%v cdb=%v byte %d, want CDB byte %d", tc.name, valid, cd, field, tc.field)
		}
	}
	if w, u := be.Bytes(blockdevtest.OpWrite), be.Bytes(blockdevtest.OpUnmap); w != 0 || u != 0 {
		t.Fatalf("refused WRITE SAMEs reached the backend: %d bytes written, %d unmapped", w, u)
	}

	// Descriptor-format sense carries the same pointer.
	r = lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opModeSense6, 0x08, pageControl, 0, 255, 0}})
	expectGood(t, "MODE SENSE control", r)
	sel := append([]byte{0, 0, 0, 0}, r.Data[4:]...)
	sel[4+2] |= 0x04 // D_SENSE
	expectGood(t, "MODE SELECT D_SENSE", lu.Execute(bg, &Command{Nexus: nexA, CDB: []byte{opModeSelect6, 0x10, 0, 0, byte(len(sel)), 0}, Data: sel}))
	r = lu.Execute(bg, &Command{Nexus: nexA, CDB: writeSame10(0, 0, 0), Data: block})
	expectSense(t, "WRITE SAME(10) 0 blocks, descriptor sense", r, KeyIllegalRequest, 0x24, 0)
	if valid, cd, field := sksField(t, r.Sense); !valid || !cd || field != 7 {
		t.Fatalf("descriptor sense field pointer valid=%v cdb=%v byte %d", valid, cd, field)
	}

	// Exactly the maximum is accepted and writes exactly that much.
	expectGood(t, "WRITE SAME(16) of the maximum", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opWriteSame16, 8, maxBlocks, 0), Data: block}))
	if w := be.Bytes(blockdevtest.OpWrite); w != MaxWriteSameBytes {
		t.Fatalf("WRITE SAME of the maximum wrote %d bytes, want %d", w, MaxWriteSameBytes)
	}
	if end := int64(8+maxBlocks) * 512; !bytes.Equal(be.Contents(end-512, 512), block) || !allZero(be.Contents(end, 512)) {
		t.Fatal("WRITE SAME of the maximum wrote the wrong blocks")
	}
	expectGood(t, "WRITE SAME(10) UNMAP of one block", lu.Execute(bg, &Command{Nexus: nexA, CDB: writeSame10(8, 1, 0x08), Data: block}))
	if u := be.Bytes(blockdevtest.OpUnmap); u != 512 {
		t.Fatalf("WRITE SAME UNMAP of one block unmapped %d bytes", u)
	}
}

// TestUnmapLBACountBoundsTheWholeCommand checks that the MAXIMUM UNMAP LBA
// COUNT limits the sum of an UNMAP's descriptors, not each one.
func TestUnmapLBACountBoundsTheWholeCommand(t *testing.T) {
	// A sparse 1 GiB file: unmapping 512 MiB of it costs nothing.
	path := filepath.Join(t.TempDir(), "unit")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 1<<30); err != nil {
		t.Fatal(err)
	}
	be, err := blockdevtest.NewFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	lu, err := New(Config{Backend: be, Name: "unmap"})
	if err != nil {
		t.Fatal(err)
	}
	attach(lu, nexA)
	param := make([]byte, 8+2*16)
	binary.BigEndian.PutUint16(param[0:2], uint16(len(param)-2))
	binary.BigEndian.PutUint16(param[2:4], 32)
	binary.BigEndian.PutUint64(param[8:16], 0)
	binary.BigEndian.PutUint32(param[16:20], maxUnmapBlocks)
	binary.BigEndian.PutUint64(param[24:32], maxUnmapBlocks)
	binary.BigEndian.PutUint32(param[32:36], 1)
	cdb := []byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, byte(len(param)), 0}
	expectSense(t, "UNMAP over the maximum LBA count", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb, Data: param}), KeyIllegalRequest, 0x26, 0)
	if u := be.Bytes(blockdevtest.OpUnmap); u != 0 {
		t.Fatalf("refused UNMAP unmapped %d bytes", u)
	}
	binary.BigEndian.PutUint32(param[16:20], maxUnmapBlocks-1)
	expectGood(t, "UNMAP of exactly the maximum LBA count", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb, Data: param}))
	if u := be.Bytes(blockdevtest.OpUnmap); u != maxUnmapBlocks*512 {
		t.Fatalf("UNMAP unmapped %d bytes", u)
	}
}

// TestTransferLengthIsBoundedInBytes checks that the default MAXIMUM
// TRANSFER LENGTH is MaxTransferBytes whatever the block size, and that a
// larger configured limit is refused.
func TestTransferLengthIsBoundedInBytes(t *testing.T) {
	for _, bs := range []int{512, 4096} {
		lu, err := New(Config{Backend: newMem(1 << 20), Name: "x", BlockSize: bs})
		if err != nil {
			t.Fatal(err)
		}
		r := lu.Execute(bg, &Command{CDB: []byte{opInquiry, 0x01, 0xb0, 0, 0xff, 0}})
		if got := binary.BigEndian.Uint32(r.Data[8:12]); int(got)*bs != MaxTransferBytes {
			t.Fatalf("block size %d: MAXIMUM TRANSFER LENGTH %d blocks", bs, got)
		}
	}
	if _, err := New(Config{Backend: newMem(1 << 20), Name: "x", BlockSize: 4096, MaxTransferBlocks: MaxTransferBytes/4096 + 1}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("transfer limit above %d bytes accepted: %v", MaxTransferBytes, err)
	}
}
