package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"slices"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
)

// Record types.
const (
	recEntries    byte = 1 // entries of one group; payload: count u32, then per entry index u64, term u64, type u8, len u32, data
	recHardState  byte = 2 // payload: term u64, vote u64, commit u64
	recSnapshot   byte = 3 // the group's log now starts after a snapshot; payload: index u64, term u64, conf state (protobuf)
	recEndSegment byte = 4 // the segment is complete; the log continues in the next one
	// recForget: the group's earlier records are obsolete (its copyset was
	// removed; a copyset created later with the same id starts afresh). No
	// payload.
	recForget byte = 5
	// recSnapshotEpoch supersedes recSnapshot (still read): payload index
	// u64, term u64, configuration epoch u64, conf state length u32, conf
	// state (protobuf), applied requests (the rest).
	recSnapshotEpoch byte = 6
)

const (
	recordHeaderSize = 17 // length u32 + crc u32 + type u8 + group u64
	headerBlockSize  = 4096
	// pageSize is the page cache's unit: every write of a group commit
	// ends on a page boundary (see batchWriter.flush).
	pageSize       = 4096
	segmentMagic   = "CAIRNWAL"
	segmentVersion = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt is returned (wrapped) by Open when a segment that is not the
// last one holds an invalid record before its end-of-segment record and the
// log cannot be trusted past it. Open recovers from torn tails on its own;
// this error means damage in the middle of the log.
var ErrCorrupt = errors.New("wal: corrupt segment")

// encodeSegmentHeader fills the header block of segment seq.
func encodeSegmentHeader(buf []byte, seq uint64) {
	clear(buf[:headerBlockSize])
	copy(buf, segmentMagic)
	binary.LittleEndian.PutUint32(buf[8:], segmentVersion)
	binary.LittleEndian.PutUint64(buf[12:], seq)
	binary.LittleEndian.PutUint32(buf[20:], crc32.Checksum(buf[:20], castagnoli))
}

// decodeSegmentHeader returns the sequence number of a segment header, or
// ok=false when the block holds no valid header (a file never written to).
func decodeSegmentHeader(buf []byte) (seq uint64, ok bool, err error) {
	if len(buf) < 24 {
		return 0, false, fmt.Errorf("%w: short header", ErrCorrupt)
	}
	allZero := true
	for _, b := range buf[:24] {
		if b != 0 {
			allZero = false
			break
		}
	}
	if allZero {
		return 0, false, nil
	}
	if string(buf[:8]) != segmentMagic {
		return 0, false, fmt.Errorf("%w: bad magic %q", ErrCorrupt, buf[:8])
	}
	if v := binary.LittleEndian.Uint32(buf[8:]); v != segmentVersion {
		return 0, false, fmt.Errorf("%w: unsupported format version %d", ErrCorrupt, v)
	}
	if crc32.Checksum(buf[:20], castagnoli) != binary.LittleEndian.Uint32(buf[20:]) {
		return 0, false, fmt.Errorf("%w: header checksum mismatch", ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(buf[12:]), true, nil
}

// appendRecord appends one framed record to buf.
func appendRecord(buf []byte, seq uint64, typ byte, group uint64, payload []byte) []byte {
	return appendRecordWith(buf, seq, typ, group, len(payload), func(b []byte) []byte { return append(b, payload...) })
}

// appendRecordWith appends one framed record whose payload, of size bytes,
// fill appends in place: a batch's entries are encoded straight into the
// buffer that is written, not into a scratch buffer first.
func appendRecordWith(buf []byte, seq uint64, typ byte, group uint64, size int, fill func([]byte) []byte) []byte {
	start := len(buf)
	buf = slices.Grow(buf, recordHeaderSize+size)[:start+recordHeaderSize]
	buf = fill(buf)
	hdr, payload := buf[start:start+recordHeaderSize], buf[start+recordHeaderSize:]
	binary.LittleEndian.PutUint32(hdr[0:], uint32(len(payload)))
	hdr[8] = typ
	binary.LittleEndian.PutUint64(hdr[9:], group)
	var seqb [8]byte
	binary.LittleEndian.PutUint64(seqb[:], seq)
	crc := crc32.Update(0, castagnoli, seqb[:])
	crc = crc32.Update(crc, castagnoli, hdr[8:])
	crc = crc32.Update(crc, castagnoli, payload)
	binary.LittleEndian.PutUint32(hdr[4:], crc)
	return buf
}

// record is a decoded record.
type record struct {
	typ     byte
	group   uint64
	payload []byte
}

// decodeRecord reads the record at buf[0:]. It returns ok=false when no valid
// record starts there (end of data or a torn write).
func decodeRecord(buf []byte, seq uint64) (rec record, size int, ok bool) {
	if len(buf) < recordHeaderSize {
		return record{}, 0, false
	}
	n := binary.LittleEndian.Uint32(buf[0:])
	if n == 0 && binary.LittleEndian.Uint32(buf[4:]) == 0 && buf[8] == 0 {
		return record{}, 0, false
	}
	if uint64(n) > uint64(len(buf)-recordHeaderSize) {
		return record{}, 0, false
	}
	var seqb [8]byte
	binary.LittleEndian.PutUint64(seqb[:], seq)
	crc := crc32.Update(0, castagnoli, seqb[:])
	crc = crc32.Update(crc, castagnoli, buf[8:recordHeaderSize+int(n)])
	if crc != binary.LittleEndian.Uint32(buf[4:]) {
		return record{}, 0, false
	}
	rec = record{
		typ:     buf[8],
		group:   binary.LittleEndian.Uint64(buf[9:]),
		payload: buf[recordHeaderSize : recordHeaderSize+int(n)],
	}
	return rec, recordHeaderSize + int(n), true
}

// entriesPayloadSize is the encoded size of ents.
func entriesPayloadSize(ents []*raftpb.Entry) int {
	n := 4
	for _, e := range ents {
		n += 8 + 8 + 1 + 4 + len(e.GetData())
	}
	return n
}

func appendEntriesPayload(buf []byte, ents []*raftpb.Entry) []byte {
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(ents)))
	for _, e := range ents {
		buf = binary.LittleEndian.AppendUint64(buf, e.GetIndex())
		buf = binary.LittleEndian.AppendUint64(buf, e.GetTerm())
		buf = append(buf, byte(e.GetType()))
		buf = binary.LittleEndian.AppendUint32(buf, uint32(len(e.GetData())))
		buf = append(buf, e.GetData()...)
	}
	return buf
}

// decodeEntries decodes an entries payload. The returned entries copy their
// data out of p.
func decodeEntries(p []byte) ([]*raftpb.Entry, error) {
	if len(p) < 4 {
		return nil, fmt.Errorf("%w: short entries record", ErrCorrupt)
	}
	count := binary.LittleEndian.Uint32(p)
	p = p[4:]
	if uint64(count) > uint64(len(p))/21 {
		return nil, fmt.Errorf("%w: entries record claims %d entries in %d bytes", ErrCorrupt, count, len(p))
	}
	ents := make([]*raftpb.Entry, 0, count)
	for i := uint32(0); i < count; i++ {
		if len(p) < 21 {
			return nil, fmt.Errorf("%w: truncated entry", ErrCorrupt)
		}
		idx := binary.LittleEndian.Uint64(p)
		term := binary.LittleEndian.Uint64(p[8:])
		typ := raftpb.EntryType(p[16])
		n := binary.LittleEndian.Uint32(p[17:])
		p = p[21:]
		if uint64(n) > uint64(len(p)) {
			return nil, fmt.Errorf("%w: truncated entry data", ErrCorrupt)
		}
		var data []byte
		if n > 0 {
			data = append([]byte(nil), p[:n]...)
		}
		p = p[n:]
		ents = append(ents, &raftpb.Entry{Index: &idx, Term: &term, Type: &typ, Data: data})
	}
	return ents, nil
}

func appendHardStatePayload(buf []byte, hs *raftpb.HardState) []byte {
	buf = binary.LittleEndian.AppendUint64(buf, hs.GetTerm())
	buf = binary.LittleEndian.AppendUint64(buf, hs.GetVote())
	return binary.LittleEndian.AppendUint64(buf, hs.GetCommit())
}

func decodeHardState(p []byte) (*raftpb.HardState, error) {
	if len(p) != 24 {
		return nil, fmt.Errorf("%w: hard state record of %d bytes", ErrCorrupt, len(p))
	}
	t := binary.LittleEndian.Uint64(p)
	v := binary.LittleEndian.Uint64(p[8:])
	c := binary.LittleEndian.Uint64(p[16:])
	return &raftpb.HardState{Term: &t, Vote: &v, Commit: &c}, nil
}

func appendSnapshotPayload(buf []byte, s *SnapshotMark) ([]byte, error) {
	buf = binary.LittleEndian.AppendUint64(buf, s.Index)
	buf = binary.LittleEndian.AppendUint64(buf, s.Term)
	buf = binary.LittleEndian.AppendUint64(buf, s.ConfEpoch)
	cs, err := proto.Marshal(s.ConfState)
	if err != nil {
		return nil, fmt.Errorf("wal: encode conf state: %w", err)
	}
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(cs)))
	buf = append(buf, cs...)
	return append(buf, s.Requests...), nil
}

// decodeSnapshot decodes a snapshot record of type recSnapshot (written
// before configuration epochs were recorded: ConfEpoch reads 0) or
// recSnapshotEpoch.
func decodeSnapshot(typ byte, p []byte) (*SnapshotMark, error) {
	fixed := 28
	if typ == recSnapshot {
		fixed = 16
	}
	if len(p) < fixed {
		return nil, fmt.Errorf("%w: short snapshot record", ErrCorrupt)
	}
	s := &SnapshotMark{Index: binary.LittleEndian.Uint64(p), Term: binary.LittleEndian.Uint64(p[8:]), ConfState: &raftpb.ConfState{}}
	cs := p[16:]
	if typ == recSnapshotEpoch {
		s.ConfEpoch = binary.LittleEndian.Uint64(p[16:])
		n := binary.LittleEndian.Uint32(p[24:])
		if uint64(n) > uint64(len(p)-fixed) {
			return nil, fmt.Errorf("%w: snapshot record's conf state of %d bytes overruns it", ErrCorrupt, n)
		}
		cs = p[fixed : fixed+int(n)]
		if rest := p[fixed+int(n):]; len(rest) > 0 {
			s.Requests = append([]byte(nil), rest...)
		}
	}
	if err := proto.Unmarshal(cs, s.ConfState); err != nil {
		return nil, fmt.Errorf("%w: snapshot conf state: %v", ErrCorrupt, err)
	}
	return s, nil
}

// MergeHardState returns the newer of two hard states of one group, field by
// field as Raft only ever moves them forward: a higher term wins outright
// (with its vote); within a term a vote, once cast, stays; the commit index
// only grows. Either argument may be nil.
func MergeHardState(a, b *raftpb.HardState) *raftpb.HardState {
	if a == nil {
		return b
	}
	if b == nil {
		return a
	}
	if b.GetTerm() > a.GetTerm() {
		a, b = b, a
	}
	term, vote := a.GetTerm(), a.GetVote()
	if b.GetTerm() == term && vote == 0 {
		vote = b.GetVote()
	}
	commit := max(a.GetCommit(), b.GetCommit())
	return &raftpb.HardState{Term: &term, Vote: &vote, Commit: &commit}
}
