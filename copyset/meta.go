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
// chunk files. It is written at every checkpoint (see metaWriter): the chunk
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

// The meta file has two slots of the same size, a multiple of the page and
// file system block size. A slot holds a header (magic, generation, payload
// length, CRC32C of the generation, length and payload) and the meta as
// JSON; the slot with the highest valid generation is the checkpoint. A
// checkpoint writes generation g+1 into slot (g+1)%2 in place and
// fdatasyncs it: the file keeps its size and blocks, so no journal commit
// is needed, and a torn write leaves slot g%2, the previous checkpoint,
// intact (the WAL learns of a checkpoint only after the write returned, so
// it still holds everything after the previous one).
//
// The generation g is the one metaWriter last made durable, kept in memory,
// never read back from the file: after a failed fdatasync the page cache
// may show a slot the disk does not hold, and writing "the other slot"
// from what the cache shows would overwrite the only durable one. After
// any failure, after the first write of a copyset, for a file of the plain
// JSON layout written before slots existed, and when the meta outgrows its
// slot, the file is replaced whole (temp, fsync, rename, fsync dir), which
// repairs whatever the failure left.
const (
	metaMagic      = "CAIRNMT2"
	metaSlotHeader = 24 // magic 8 | generation u64 | length u32 | crc u32
	metaMinSlot    = 4096
)

// metaWriter writes one copyset's meta file. Not safe for concurrent use:
// its writes are serialized by the state machine's lock.
type metaWriter struct {
	dir  string
	gen  uint64 // generation last made durable
	slot int64  // slot size of the durable file; 0: replace the file whole next time
}

// loadMeta reads dir's meta and makes what it read durable (a process that
// crashed after writing a slot and before syncing it may have left it in
// the page cache only), so that the WAL may rely on it.
func loadMeta(dir string) (*meta, *metaWriter, error) {
	m, gen, slot, err := readMetaFile(dir)
	if err != nil {
		return nil, nil, err
	}
	path := filepath.Join(dir, metaFile)
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("open copyset meta: %w", err)
	}
	serr := unix.Fdatasync(int(f.Fd()))
	f.Close()
	if serr == nil {
		serr = fsutil.SyncDir(dir)
	}
	if serr != nil {
		return nil, nil, fmt.Errorf("sync copyset meta %s: %w", path, serr)
	}
	return m, &metaWriter{dir: dir, gen: gen, slot: slot}, nil
}

// write durably records m: in place in the next slot when it fits, else as
// a new file.
func (w *metaWriter) write(m *meta) error {
	m.Version = metaVersion
	m.CRC = m.checksum()
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode copyset meta: %w", err)
	}
	path := filepath.Join(w.dir, metaFile)
	gen := w.gen + 1
	if w.slot > 0 && metaSlotHeader+len(b) <= int(w.slot) {
		if err := writeMetaSlot(path, encodeMetaSlot(gen, b, 0), int64(gen%2)*w.slot); err != nil {
			w.slot = 0
			return err
		}
		w.gen = gen
		return nil
	}
	slot := metaSlotSize(w.dir)
	for slot < 2*int64(metaSlotHeader+len(b)) {
		slot *= 2
	}
	file := make([]byte, 2*slot)
	copy(file[int64(gen%2)*slot:], encodeMetaSlot(gen, b, int(slot)))
	w.slot = 0
	if err := fsutil.WriteFileAtomic(path, file, 0o644); err != nil {
		return err
	}
	w.gen, w.slot = gen, slot
	return nil
}

// writeMetaSlot writes one slot in place and fdatasyncs it.
func writeMetaSlot(path string, b []byte, off int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("write copyset meta: %w", err)
	}
	_, err = f.WriteAt(b, off)
	if err == nil {
		err = unix.Fdatasync(int(f.Fd()))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write copyset meta %s: %w", path, err)
	}
	return nil
}

// metaSlotSize is the smallest slot for dir: a page and a file system block
// at least, so that writing one slot never rewrites a page or block of the
// other.
func metaSlotSize(dir string) int64 {
	n := max(int64(metaMinSlot), int64(os.Getpagesize()))
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) == nil && st.Bsize > 0 {
		n = max(n, int64(st.Bsize))
	}
	return n
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
// meta file of the slot layout: its generation, the slot size and its
// payload (nil when no slot is valid or the file has another layout).
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
	if payload == nil {
		return 0, 0, nil
	}
	return gen, slot, payload
}

// readMeta reads and verifies dir's meta file.
func readMeta(dir string) (*meta, error) {
	m, _, _, err := readMetaFile(dir)
	return m, err
}

// readMetaFile is readMeta that also tells the generation and slot size of
// the slot it read (0, 0 for a file of the plain JSON layout).
func readMetaFile(dir string) (m *meta, gen uint64, slot int64, err error) {
	raw, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return nil, 0, 0, fmt.Errorf("read copyset meta: %w", err)
	}
	gen, slot, b := latestMetaSlot(raw)
	if b == nil {
		if len(raw) == 0 || raw[0] != '{' {
			return nil, 0, 0, fmt.Errorf("%w: %s: no valid slot", ErrMetaCorrupt, dir)
		}
		b = raw // the plain JSON layout
	}
	m = &meta{}
	if err := json.Unmarshal(b, m); err != nil {
		return nil, 0, 0, fmt.Errorf("%w: %s: %v", ErrMetaCorrupt, dir, err)
	}
	if m.Version != metaVersion {
		return nil, 0, 0, fmt.Errorf("%w: %s: version %d", ErrMetaCorrupt, dir, m.Version)
	}
	if m.CRC != m.checksum() {
		return nil, 0, 0, fmt.Errorf("%w: %s: checksum mismatch", ErrMetaCorrupt, dir)
	}
	return m, gen, slot, nil
}
