package copyset

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"

	"cairn.io/cairn/chunkfilepool/fsutil"

	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"
)

const metaFile = "raft.meta"

// meta is a copyset's durable checkpoint, kept in its directory beside the
// chunk files. It is written at every checkpoint (see writeMeta): the chunk
// files are fdatasynced first, so the state machine is known durable up to
// Applied and the WAL may drop entries at or below it.
type meta struct {
	Version uint32 `json:"version"`
	Pool    uint32 `json:"logical_pool_id"`
	Copyset uint32 `json:"copyset_id"`
	// The state machine reflects every entry up to Applied (whose term is
	// AppliedTerm) and the configuration ConfState.
	Applied     uint64   `json:"applied"`
	AppliedTerm uint64   `json:"applied_term"`
	Voters      []uint64 `json:"voters"`
	Learners    []uint64 `json:"learners,omitempty"`
	VotersOut   []uint64 `json:"voters_outgoing,omitempty"`
	LearnersNxt []uint64 `json:"learners_next,omitempty"`
	AutoLeave   bool     `json:"auto_leave,omitempty"`
	// ConfEpoch is the log index of the last applied membership change.
	ConfEpoch uint64 `json:"conf_epoch"`
	// The Raft hard state durable at the time of the checkpoint.
	Term   uint64 `json:"term"`
	Vote   uint64 `json:"vote"`
	Commit uint64 `json:"commit"`
	// Requests is the table of client requests applied up to Applied
	// (dedup.go), encoded.
	Requests []byte `json:"applied_requests,omitempty"`
	CRC      uint32 `json:"crc"`
}

const metaVersion = 1

// ErrMetaCorrupt is returned when a copyset's meta file fails its checksum.
var ErrMetaCorrupt = errors.New("copyset: meta file corrupt")

func (m *meta) confState() *raftpb.ConfState {
	return &raftpb.ConfState{Voters: m.Voters, Learners: m.Learners, VotersOutgoing: m.VotersOut, LearnersNext: m.LearnersNxt, AutoLeave: &m.AutoLeave}
}

func (m *meta) setConfState(cs *raftpb.ConfState) {
	m.Voters = append([]uint64(nil), cs.GetVoters()...)
	m.Learners = append([]uint64(nil), cs.GetLearners()...)
	m.VotersOut = append([]uint64(nil), cs.GetVotersOutgoing()...)
	m.LearnersNxt = append([]uint64(nil), cs.GetLearnersNext()...)
	m.AutoLeave = cs.GetAutoLeave()
}

func (m *meta) hardState() *raftpb.HardState {
	t, v, c := m.Term, m.Vote, m.Commit
	return &raftpb.HardState{Term: &t, Vote: &v, Commit: &c}
}

func (m *meta) checksum() uint32 {
	c := *m
	c.CRC = 0
	b, _ := json.Marshal(&c)
	return crc32.Checksum(b, castagnoli)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// The meta file has two slots of slotSize bytes each, a multiple of the
// page size. A slot holds a header (magic, generation, payload length,
// CRC32C of the generation, length and payload) and the meta as JSON; the
// slot with the highest valid generation is the checkpoint. A checkpoint
// writes generation g+1 into slot (g+1)%2 in place and fdatasyncs: the file
// keeps its size and blocks, so no journal commit is needed, and a torn
// write leaves the other slot, the previous checkpoint, intact (the WAL
// learns of a checkpoint only after writeMeta returned, so it still holds
// everything after the previous one). A meta that outgrows its slot, and
// the first write of a copyset, replace the file whole (temp, fsync,
// rename, fsync dir) with slots twice the size needed. A file written
// before slots existed is plain JSON and still read.
const (
	metaMagic      = "CAIRNMT2"
	metaSlotHeader = 24 // magic 8 | generation u64 | length u32 | crc u32
	metaMinSlot    = 4096
)

// writeMeta durably records m as dir's meta: in place in the next slot
// when it fits, else as a new file.
func writeMeta(dir string, m *meta) error {
	m.Version = metaVersion
	m.CRC = m.checksum()
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode copyset meta: %w", err)
	}
	path := filepath.Join(dir, metaFile)
	gen, slot := uint64(0), int64(0)
	var cur []byte
	if raw, err := os.ReadFile(path); err == nil {
		gen, slot, cur = latestMetaSlot(raw)
	}
	if cur != nil && metaSlotHeader+len(b) <= int(slot) {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return fmt.Errorf("write copyset meta: %w", err)
		}
		gen++
		_, werr := f.WriteAt(encodeMetaSlot(gen, b, 0), int64(gen%2)*slot)
		if werr == nil {
			werr = unix.Fdatasync(int(f.Fd()))
		}
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr != nil {
			return fmt.Errorf("write copyset meta %s: %w", path, werr)
		}
		return nil
	}
	gen++
	slot = int64(metaMinSlot)
	for slot < 2*int64(metaSlotHeader+len(b)) {
		slot *= 2
	}
	file := make([]byte, 2*slot)
	copy(file[int64(gen%2)*slot:], encodeMetaSlot(gen, b, int(slot)))
	return fsutil.WriteFileAtomic(path, file, 0o644)
}

// encodeMetaSlot lays out one slot holding payload, padded to size bytes
// (0: not padded).
func encodeMetaSlot(gen uint64, payload []byte, size int) []byte {
	n := max(size, metaSlotHeader+len(payload))
	b := make([]byte, metaSlotHeader, n)
	copy(b, metaMagic)
	binary.LittleEndian.PutUint64(b[8:], gen)
	binary.LittleEndian.PutUint32(b[16:], uint32(len(payload)))
	crc := crc32.Update(0, castagnoli, b[8:20])
	crc = crc32.Update(crc, castagnoli, payload)
	binary.LittleEndian.PutUint32(b[20:], crc)
	b = append(b, payload...)
	return b[:n]
}

// latestMetaSlot finds the valid slot with the highest generation in a
// meta file: its generation, the slot size and its payload. A file of
// another layout gives slot 0.
func latestMetaSlot(raw []byte) (gen uint64, slot int64, payload []byte) {
	if len(raw) < 2*metaMinSlot || len(raw)%(2*metaMinSlot) != 0 {
		return 0, 0, nil
	}
	slot = int64(len(raw) / 2)
	for i := range int64(2) {
		s := raw[i*slot : (i+1)*slot]
		if string(s[:8]) != metaMagic {
			continue
		}
		g := binary.LittleEndian.Uint64(s[8:])
		n := int64(binary.LittleEndian.Uint32(s[16:]))
		if n > slot-metaSlotHeader || g%2 != uint64(i) {
			continue
		}
		crc := crc32.Update(0, castagnoli, s[8:20])
		crc = crc32.Update(crc, castagnoli, s[metaSlotHeader:metaSlotHeader+n])
		if crc != binary.LittleEndian.Uint32(s[20:]) || (payload != nil && g <= gen) {
			continue
		}
		gen, payload = g, s[metaSlotHeader:metaSlotHeader+n]
	}
	return gen, slot, payload
}

// readMeta reads and verifies dir's meta file.
func readMeta(dir string) (*meta, error) {
	raw, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return nil, fmt.Errorf("read copyset meta: %w", err)
	}
	b := raw
	if len(raw) == 0 || raw[0] != '{' {
		_, _, b = latestMetaSlot(raw)
		if b == nil {
			return nil, fmt.Errorf("%w: %s: no valid slot", ErrMetaCorrupt, dir)
		}
	}
	m := &meta{}
	if err := json.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrMetaCorrupt, dir, err)
	}
	if m.Version != metaVersion {
		return nil, fmt.Errorf("%w: %s: version %d", ErrMetaCorrupt, dir, m.Version)
	}
	if m.CRC != m.checksum() {
		return nil, fmt.Errorf("%w: %s: checksum mismatch", ErrMetaCorrupt, dir)
	}
	return m, nil
}
