package scsi

import "encoding/binary"

// modeParams holds the mode parameters an initiator may change.
type modeParams struct {
	dsense bool // control page D_SENSE: descriptor format sense data
	swp    bool // control page SWP: software write protect
}

func defaultModeParams() modeParams { return modeParams{} }

// Mode page codes.
const (
	pageRWErrorRecovery = 0x01
	pageCaching         = 0x08
	pageControl         = 0x0a
	pageInfoExceptions  = 0x1c
	pageAll             = 0x3f
)

var modePageOrder = []byte{pageRWErrorRecovery, pageCaching, pageControl, pageInfoExceptions}

// modePage returns page code's current (pc 0), changeable (pc 1) or
// default (pc 2) values, or nil if the page is not supported.
func (lu *LogicalUnit) modePage(code byte, pc byte, m modeParams) []byte {
	var p []byte
	switch code {
	case pageRWErrorRecovery:
		p = make([]byte, 12)
		p[1] = 0x0a
	case pageCaching:
		p = make([]byte, 20)
		p[1] = 0x12
		if pc != 1 {
			p[2] = 0x04 // WCE: writes are durable only after SYNCHRONIZE CACHE or FUA
		}
	case pageControl:
		p = make([]byte, 12)
		p[1] = 0x0a
		switch pc {
		case 1:
			p[2] = 0x04 // D_SENSE
			p[4] = 0x08 // SWP
		default:
			if pc == 0 && m.dsense {
				p[2] |= 0x04
			}
			p[3] = 0x10 // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
			if pc == 0 && m.swp {
				p[4] |= 0x08
			}
			binary.BigEndian.PutUint16(p[8:10], 0xffff) // busy timeout: unlimited
		}
	case pageInfoExceptions:
		p = make([]byte, 12)
		p[1] = 0x0a
	default:
		return nil
	}
	p[0] = code
	return p
}

func (lu *LogicalUnit) modeSense(cdb []byte, blocks uint64) Response {
	six := cdb[0] == opModeSense6
	dbd := cdb[1]&0x08 != 0
	llbaa := !six && cdb[1]&0x10 != 0
	pc := cdb[2] >> 6
	page := cdb[2] & 0x3f
	subpage := cdb[3]
	var alloc int
	if six {
		alloc = int(cdb[4])
	} else {
		alloc = int(binary.BigEndian.Uint16(cdb[7:9]))
	}
	if pc == 3 {
		return lu.checkCondition(senseSavingNotSupported)
	}
	if subpage != 0 && !(page == pageAll && subpage == 0xff) {
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	lu.mu.Lock()
	m := lu.modes
	lu.mu.Unlock()
	var pages []byte
	if page == pageAll {
		for _, c := range modePageOrder {
			pages = append(pages, lu.modePage(c, pc, m)...)
		}
	} else {
		p := lu.modePage(page, pc, m)
		if p == nil {
			return lu.checkCondition(senseInvalidFieldInCDB)
		}
		pages = p
	}
	var bd []byte
	if !dbd {
		if llbaa {
			bd = make([]byte, 16)
			binary.BigEndian.PutUint64(bd[0:8], blocks)
			binary.BigEndian.PutUint32(bd[12:16], uint32(lu.bs))
		} else {
			bd = make([]byte, 8)
			binary.BigEndian.PutUint32(bd[0:4], uint32(min(blocks, 0xffffffff)))
			bd[5], bd[6], bd[7] = byte(lu.bs>>16), byte(lu.bs>>8), byte(lu.bs)
		}
	}
	devSpecific := byte(0x10) // DPOFUA
	if lu.readOnly || m.swp {
		devSpecific |= 0x80
	}
	var out []byte
	if six {
		out = make([]byte, 4)
		out[2] = devSpecific
		out[3] = byte(len(bd))
	} else {
		out = make([]byte, 8)
		out[3] = devSpecific
		if len(bd) == 16 {
			out[4] = 0x01 // LONGLBA
		}
		binary.BigEndian.PutUint16(out[6:8], uint16(len(bd)))
	}
	out = append(out, bd...)
	out = append(out, pages...)
	if six {
		out[0] = byte(len(out) - 1)
	} else {
		binary.BigEndian.PutUint16(out[0:2], uint16(len(out)-2))
	}
	return allocate(out, alloc)
}

func (lu *LogicalUnit) modeSelect(cdb []byte, data []byte, id string) Response {
	six := cdb[0] == opModeSelect6
	if cdb[1]&0x01 != 0 { // SP: parameters cannot be saved
		return lu.checkCondition(senseInvalidFieldInCDB)
	}
	var plen int
	if six {
		plen = int(cdb[4])
	} else {
		plen = int(binary.BigEndian.Uint16(cdb[7:9]))
	}
	if plen == 0 {
		return good(nil)
	}
	if len(data) < plen {
		return lu.checkCondition(senseParamListLength)
	}
	data = data[:plen]
	hdr := 4
	if !six {
		hdr = 8
	}
	if len(data) < hdr {
		return lu.checkCondition(senseParamListLength)
	}
	var bdlen int
	if six {
		bdlen = int(data[3])
	} else {
		bdlen = int(binary.BigEndian.Uint16(data[6:8]))
	}
	if hdr+bdlen > len(data) {
		return lu.checkCondition(senseParamListLength)
	}
	if bdlen > 0 {
		bd := data[hdr : hdr+bdlen]
		var bl uint32
		switch bdlen {
		case 8:
			bl = uint32(bd[5])<<16 | uint32(bd[6])<<8 | uint32(bd[7])
		case 16:
			bl = binary.BigEndian.Uint32(bd[12:16])
		default:
			return lu.checkCondition(senseInvalidFieldInParam)
		}
		if bl != 0 && int64(bl) != lu.bs {
			return lu.checkCondition(senseInvalidFieldInParam)
		}
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	m := lu.modes
	rest := data[hdr+bdlen:]
	for len(rest) > 0 {
		if len(rest) < 2 || rest[0]&0x40 != 0 { // subpage format not supported
			return lu.checkConditionLocked(senseInvalidFieldInParam)
		}
		code := rest[0] & 0x3f
		n := int(rest[1]) + 2
		if n > len(rest) {
			return lu.checkConditionLocked(senseParamListLength)
		}
		got := rest[:n]
		rest = rest[n:]
		cur := lu.modePage(code, 0, m)
		mask := lu.modePage(code, 1, m)
		if cur == nil || len(cur) != n {
			return lu.checkConditionLocked(senseInvalidFieldInParam)
		}
		for i := 2; i < n; i++ {
			if (got[i]^cur[i])&^mask[i] != 0 {
				return lu.checkConditionLocked(senseInvalidFieldInParam)
			}
		}
		if code == pageControl {
			m.dsense = got[2]&0x04 != 0
			m.swp = got[4]&0x08 != 0
		}
	}
	if m != lu.modes {
		lu.modes = m
		lu.uaAllLocked(senseModeParamsChanged, id, false)
	}
	return good(nil)
}

func (lu *LogicalUnit) checkConditionLocked(s Sense) Response {
	return Response{Status: StatusCheckCondition, Sense: s.Encode(lu.modes.dsense)}
}
