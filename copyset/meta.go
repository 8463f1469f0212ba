package copyset

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"

	"cairn.io/cairn/chunkfilepool/fsutil"

	"go.etcd.io/raft/v3/raftpb"
)

const metaFile = "raft.meta"

// meta is a copyset's durable checkpoint, kept in its directory beside the
// chunk files. It is rewritten (temp + fsync + rename + fsync dir) at every
// checkpoint: the chunk files are fdatasynced first, so the state machine is
// known durable up to Applied and the WAL may drop entries at or below it.
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
	return crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli))
}

// writeMeta durably replaces dir's meta file.
func writeMeta(dir string, m *meta) error {
	m.Version = metaVersion
	m.CRC = m.checksum()
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode copyset meta: %w", err)
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, metaFile), b, 0o644)
}

// readMeta reads and verifies dir's meta file.
func readMeta(dir string) (*meta, error) {
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return nil, fmt.Errorf("read copyset meta: %w", err)
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
