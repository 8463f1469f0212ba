package scsi

import (
	"encoding/binary"
	"sort"
)

// Persistent reservation types (SPC-4 table 169).
const (
	prWriteExclusive      = 0x1
	prExclusiveAccess     = 0x3
	prWriteExclusiveRO    = 0x5
	prExclusiveAccessRO   = 0x6
	prWriteExclusiveAR    = 0x7
	prExclusiveAccessAR   = 0x8
	senseInvalidPRRelease = 0x04 // ASCQ with ASC 26h
)

// persistentReservations is the unit's PR state, kept in memory and guarded
// by LogicalUnit.mu. A reservation exists when typ != 0.
type persistentReservations struct {
	generation uint32
	regs       map[string]*prRegistration
	seq        int
	holder     string // nexus holding a non-all-registrants reservation
	typ        byte
}

type prRegistration struct {
	key   uint64
	nexus *Nexus
	seq   int // registration order, for stable reports
}

func allRegistrants(t byte) bool { return t == prWriteExclusiveAR || t == prExclusiveAccessAR }

func validPRType(t byte) bool {
	switch t {
	case prWriteExclusive, prExclusiveAccess, prWriteExclusiveRO, prExclusiveAccessRO, prWriteExclusiveAR, prExclusiveAccessAR:
		return true
	}
	return false
}

func (pr *persistentReservations) isHolder(id string) bool {
	if pr.typ == 0 {
		return false
	}
	if allRegistrants(pr.typ) {
		return pr.regs[id] != nil
	}
	return pr.holder == id
}

func (pr *persistentReservations) sortedRegs() []*prRegistration {
	out := make([]*prRegistration, 0, len(pr.regs))
	for _, r := range pr.regs {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].seq < out[j].seq })
	return out
}

// command classes for reservation checks.
const (
	classAllowed = iota
	classRead
	classWrite
)

func commandClass(cdb []byte) int {
	switch cdb[0] {
	case opInquiry, opReportLUNs, opRequestSense, opTestUnitReady, opReadCapacity10,
		opPersistReserveIn, opPersistReserveOut, opRelease6, opRelease10, opMaintenanceIn:
		return classAllowed
	case opServiceActionIn16:
		if cdb[1]&0x1f == saReadCapacity16 {
			return classAllowed
		}
		return classRead
	case opRead6, opRead10, opRead12, opRead16, opVerify10, opVerify12, opVerify16,
		opPrefetch10, opPrefetch16, opModeSense6, opModeSense10:
		return classRead
	}
	return classWrite
}

// reservationConflict reports whether the command from nexus id conflicts
// with a RESERVE(6) or persistent reservation held by another nexus.
func (lu *LogicalUnit) reservationConflict(id string, cdb []byte) bool {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	op := cdb[0]
	if lu.reserve6 != "" && lu.reserve6 != id {
		switch op {
		case opInquiry, opReportLUNs, opRequestSense, opRelease6, opRelease10:
			return false
		}
		return true
	}
	pr := &lu.pr
	if pr.typ == 0 || pr.isHolder(id) {
		return false
	}
	class := commandClass(cdb)
	if class == classAllowed {
		return false
	}
	registered := pr.regs[id] != nil
	switch pr.typ {
	case prWriteExclusive:
		return class == classWrite
	case prExclusiveAccess:
		return true
	case prWriteExclusiveRO, prWriteExclusiveAR:
		return !registered && class == classWrite
	case prExclusiveAccessRO, prExclusiveAccessAR:
		return !registered
	}
	return false
}

func (lu *LogicalUnit) reserve(cdb []byte, id string) Response {
	if cdb[0] == opReserve10 && cdb[1]&0x02 != 0 { // third-party reservations
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.pr.typ != 0 && !lu.pr.isHolder(id) {
		return Response{Status: StatusReservationConflict}
	}
	if lu.reserve6 != "" && lu.reserve6 != id {
		return Response{Status: StatusReservationConflict}
	}
	lu.reserve6 = id
	return good(nil)
}

func (lu *LogicalUnit) release(cdb []byte, id string) Response {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.reserve6 == id {
		lu.reserve6 = ""
	}
	return good(nil)
}

func (lu *LogicalUnit) persistentReserveIn(cdb []byte) Response {
	alloc := int(binary.BigEndian.Uint16(cdb[7:9]))
	lu.mu.Lock()
	defer lu.mu.Unlock()
	pr := &lu.pr
	out := make([]byte, 8)
	binary.BigEndian.PutUint32(out[0:4], pr.generation)
	switch cdb[1] & 0x1f {
	case 0x00: // READ KEYS
		for _, r := range pr.sortedRegs() {
			out = binary.BigEndian.AppendUint64(out, r.key)
		}
		binary.BigEndian.PutUint32(out[4:8], uint32(len(out)-8))
	case 0x01: // READ RESERVATION
		if pr.typ != 0 {
			d := make([]byte, 16)
			if !allRegistrants(pr.typ) {
				if r := pr.regs[pr.holder]; r != nil {
					binary.BigEndian.PutUint64(d[0:8], r.key)
				}
			}
			d[13] = pr.typ // scope 0 (logical unit)
			out = append(out, d...)
		}
		binary.BigEndian.PutUint32(out[4:8], uint32(len(out)-8))
	case 0x02: // REPORT CAPABILITIES
		out = make([]byte, 8)
		binary.BigEndian.PutUint16(out[0:2], 8)
		out[2] = 0x10 | 0x04 // CRH, ATP_C
		out[3] = 0x80        // TMV
		out[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
		out[5] = 0x01
	case 0x03: // READ FULL STATUS
		for _, r := range pr.sortedRegs() {
			tid := transportID(r.nexus)
			d := make([]byte, 24, 24+len(tid))
			binary.BigEndian.PutUint64(d[0:8], r.key)
			if pr.isHolder(r.nexus.ID) {
				d[12] |= 0x01
				d[13] = pr.typ
			}
			binary.BigEndian.PutUint16(d[18:20], r.nexus.RelativePort)
			binary.BigEndian.PutUint32(d[20:24], uint32(len(tid)))
			out = append(out, append(d, tid...)...)
		}
		binary.BigEndian.PutUint32(out[4:8], uint32(len(out)-8))
	default:
		return lu.checkConditionLocked(senseInvalidFieldInCDB)
	}
	return allocate(out, alloc)
}

// transportID encodes an iSCSI initiator port TransportID (SPC-4 7.6.4.6,
// format 01b: name and ISID).
func transportID(n *Nexus) []byte {
	name := n.InitiatorName + ",i,0x" + n.ISID
	l := len(name) + 1
	l += (4 - l%4) % 4
	b := make([]byte, 4+l)
	b[0] = 0x40 | 0x05
	binary.BigEndian.PutUint16(b[2:4], uint16(l))
	copy(b[4:], name)
	return b
}

func (lu *LogicalUnit) persistentReserveOut(cdb []byte, data []byte, nexus *Nexus) Response {
	sa := cdb[1] & 0x1f
	scope := cdb[2] >> 4
	typ := cdb[2] & 0x0f
	plen := int(binary.BigEndian.Uint32(cdb[5:9]))
	if sa > 0x06 {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	if plen != 24 || len(data) < 24 {
		return lu.checkCondition(senseParamListLength)
	}
	resKey := binary.BigEndian.Uint64(data[0:8])
	saKey := binary.BigEndian.Uint64(data[8:16])
	flags := data[20]
	if flags&0x08 != 0 || flags&0x01 != 0 { // SPEC_I_PT, APTPL: not supported
		return lu.checkCondition(senseInvalidFieldInParam)
	}
	if nexus == nil {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	id := nexus.ID
	lu.mu.Lock()
	defer lu.mu.Unlock()
	pr := &lu.pr
	if pr.regs == nil {
		pr.regs = make(map[string]*prRegistration)
	}
	conflict := Response{Status: StatusReservationConflict}
	reg := pr.regs[id]
	switch sa {
	case 0x00, 0x06: // REGISTER, REGISTER AND IGNORE EXISTING KEY
		if sa == 0x00 {
			if reg == nil && resKey != 0 || reg != nil && reg.key != resKey {
				return conflict
			}
		}
		switch {
		case reg == nil && saKey == 0:
		case reg == nil:
			pr.seq++
			pr.regs[id] = &prRegistration{key: saKey, nexus: nexus, seq: pr.seq}
			pr.generation++
		case saKey == 0:
			lu.unregisterLocked(id)
			pr.generation++
		default:
			reg.key = saKey
			pr.generation++
		}
		return good(nil)
	}
	if reg == nil || reg.key != resKey {
		return conflict
	}
	switch sa {
	case 0x01: // RESERVE
		if scope != 0 || !validPRType(typ) {
			return lu.checkConditionLocked(senseInvalidFieldInCDB)
		}
		if lu.reserve6 != "" && lu.reserve6 != id {
			return conflict
		}
		if pr.typ != 0 {
			if pr.isHolder(id) && pr.typ == typ {
				return good(nil)
			}
			return conflict
		}
		pr.typ, pr.holder = typ, id
		return good(nil)
	case 0x02: // RELEASE
		if pr.typ == 0 || !pr.isHolder(id) {
			return good(nil)
		}
		if scope != 0 || pr.typ != typ {
			return lu.checkConditionLocked(Sense{Key: KeyIllegalRequest, ASC: 0x26, ASCQ: senseInvalidPRRelease})
		}
		lu.releaseLocked(id)
		return good(nil)
	case 0x03: // CLEAR
		for oid := range pr.regs {
			if oid != id {
				lu.uaLocked(oid, senseReservationsPreempted)
			}
		}
		pr.regs = make(map[string]*prRegistration)
		pr.typ, pr.holder = 0, ""
		pr.generation++
		return good(nil)
	case 0x04, 0x05: // PREEMPT, PREEMPT AND ABORT
		if scope != 0 || !validPRType(typ) {
			return lu.checkConditionLocked(senseInvalidFieldInCDB)
		}
		preemptHolder := false
		if pr.typ != 0 {
			if allRegistrants(pr.typ) {
				preemptHolder = saKey == 0
			} else if h := pr.regs[pr.holder]; h != nil && h.key == saKey {
				preemptHolder = true
			}
		}
		if !preemptHolder && saKey == 0 {
			return lu.checkConditionLocked(senseInvalidFieldInParam)
		}
		removed := 0
		for oid, r := range pr.regs {
			if oid == id {
				continue
			}
			if r.key == saKey || (preemptHolder && allRegistrants(pr.typ) && saKey == 0) {
				delete(pr.regs, oid)
				lu.uaLocked(oid, senseRegistrationsPreempted)
				removed++
			}
		}
		if preemptHolder {
			pr.typ, pr.holder = typ, id
		} else if removed == 0 {
			return conflict
		}
		pr.generation++
		return good(nil)
	}
	return lu.checkConditionLocked(senseInvalidFieldInCDB)
}

// unregisterLocked removes id's registration and releases the reservation
// when it was held through that registration.
func (lu *LogicalUnit) unregisterLocked(id string) {
	pr := &lu.pr
	delete(pr.regs, id)
	if pr.typ == 0 {
		return
	}
	if allRegistrants(pr.typ) {
		if len(pr.regs) == 0 {
			pr.typ, pr.holder = 0, ""
		}
		return
	}
	if pr.holder == id {
		lu.releaseLocked(id)
	}
}

// releaseLocked drops the reservation; registrants of a registrants-only
// or all-registrants reservation learn of it through a unit attention.
func (lu *LogicalUnit) releaseLocked(id string) {
	pr := &lu.pr
	old := pr.typ
	pr.typ, pr.holder = 0, ""
	if old == prWriteExclusive || old == prExclusiveAccess {
		return
	}
	for oid := range pr.regs {
		if oid != id {
			lu.uaLocked(oid, senseReservationsReleased)
		}
	}
}

func (lu *LogicalUnit) uaLocked(id string, s Sense) {
	if ns := lu.nexuses[id]; ns != nil {
		ns.addUA(s)
	}
}
