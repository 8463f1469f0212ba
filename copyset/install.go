package copyset

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/chunkfilepool/fsutil"
)

// ErrSnapshotRefused is returned to a sender whose snapshot is not needed
// or not acceptable here.
var ErrSnapshotRefused = errors.New("copyset: snapshot refused")

// installSnapshot receives a snapshot's chunk files and then hands the
// snapshot to Raft.
func (c *Copyset) installSnapshot(ctx context.Context, header *transportpb.SnapshotChunk, next func() (*transportpb.SnapshotChunk, error)) error {
	m := &raftpb.Message{}
	if err := proto.Unmarshal(header.GetRaftMessage(), m); err != nil {
		return fmt.Errorf("%w: bad snapshot message: %v", ErrSnapshotRefused, err)
	}
	if m.GetType() != raftpb.MsgSnap || m.GetSnapshot() == nil {
		return fmt.Errorf("%w: not a snapshot message", ErrSnapshotRefused)
	}
	idx := m.GetSnapshot().GetMetadata().GetIndex()
	if err := c.Broken(); err != nil {
		return fmt.Errorf("%w: this replica is broken (%v); it is rebuilt, not repaired", ErrSnapshotRefused, err)
	}
	if c.isLeader.Load() {
		return fmt.Errorf("%w: this replica leads the copyset", ErrSnapshotRefused)
	}
	// Only the leader this replica follows sends it snapshots (it probes
	// with appends first, so the follower knows it by then).
	if lead := c.leader.Load(); lead == 0 || m.GetFrom() != lead || m.GetTo() != c.e.cfg.NodeID || m.GetTerm() < c.term.Load() {
		return fmt.Errorf("%w: snapshot from %d (term %d) to %d, while this replica (%d) follows %d in term %d",
			ErrSnapshotRefused, m.GetFrom(), m.GetTerm(), m.GetTo(), c.e.cfg.NodeID, lead, c.term.Load())
	}
	if idx <= c.applied.Load() {
		return fmt.Errorf("%w: snapshot index %d is not past applied index %d", ErrSnapshotRefused, idx, c.applied.Load())
	}
	if !c.installing.CompareAndSwap(false, true) {
		return fmt.Errorf("%w: another install is under way", ErrSnapshotRefused)
	}
	c.smMu.Lock()
	complete := false
	defer func() {
		if complete {
			c.sm.installed = max(c.sm.installed, idx)
		}
		c.smMu.Unlock()
		c.installing.Store(false)
		// Let the apply worker pick up what queued meanwhile.
		c.pushApply(applyItem{ckpt: false})
	}()
	c.log.Info("installing snapshot", "index", idx, "from", m.GetFrom(), "chunks", len(header.GetFiles()))

	if _, err := decodeDedupTable(header.GetAppliedRequests()); err != nil {
		return fmt.Errorf("%w: %v", ErrSnapshotRefused, err)
	}
	held := make(map[uint64]bool)
	for _, id := range c.store.List() {
		held[id] = true
	}
	listed := make(map[uint64]bool, len(header.GetFiles()))
	created := make(map[uint64]uint64, len(header.GetFiles()))
	owned := make(map[uint64][]byte)
	for _, f := range header.GetFiles() {
		listed[f.GetChunkId()] = true
		created[f.GetChunkId()] = f.GetCreatedSn()
		if b := f.GetOwned(); len(b) > 0 {
			owned[f.GetChunkId()] = b
		}
	}
	// From the first change on, the chunk files mix two states that
	// replaying the log cannot reconcile (copies on write are not
	// idempotent): a failure fails the replica, and a crash is found at
	// the next start by the marker (see markInstalling).
	if err := c.markInstalling(idx); err != nil {
		return fmt.Errorf("install snapshot: %w", err)
	}
	defer func() {
		if !complete {
			c.fail(fmt.Errorf("snapshot install %d interrupted after chunk files changed", idx))
		}
	}()
	if err := c.receiveChunks(next, listed, created, owned, held); err != nil {
		return err
	}
	// Writing a clone chunk's data owned every page it touched: back to
	// what the sender's chunk owned.
	for id, bits := range owned {
		if !held[id] {
			continue
		}
		if err := c.store.SetOwned(id, bits); err != nil {
			return fmt.Errorf("install snapshot: chunk %d: %w", id, err)
		}
	}
	for id := range held {
		if !listed[id] {
			if err := c.store.Delete(id); err != nil {
				return fmt.Errorf("install snapshot: delete chunk %d: %w", id, err)
			}
		}
	}
	if err := c.store.Sync(nil); err != nil {
		// Pages of the chunk files may be lost (a failed writeback is
		// reported once), mixing states the log cannot repair.
		return fmt.Errorf("install snapshot: sync: %w", err)
	}
	complete = true
	c.installEpoch.Store(header.GetConfEpoch())
	reqs := header.GetAppliedRequests()
	c.installDedup.Store(&reqs)
	// Counted before Raft hears of it: once it has, the replica may apply
	// and be seen caught up before this function returns.
	c.e.snapshots.installed.Add(1)
	// Checked above, and not a message admit takes from the network.
	c.enqueue(func(in *inbox) { in.local = append(in.local, m) })
	c.log.Info("snapshot installed", "index", idx)
	return nil
}

// receiveChunks writes the chunk files of a snapshot stream: each listed
// chunk's data (reset to the sender's CreatedSN at its first frame), then
// the versions it keeps, each sealed (made durable, then marked held) when
// the next begins. held tracks the chunks the store holds.
func (c *Copyset) receiveChunks(next func() (*transportpb.SnapshotChunk, error), listed map[uint64]bool, created map[uint64]uint64, owned map[uint64][]byte, held map[uint64]bool) error {
	type version struct {
		id, from uint64
		bitmap   []byte
	}
	var open *version
	seal := func() error {
		if open == nil {
			return nil
		}
		v := open
		open = nil
		if err := c.store.SealKept(v.id, v.from, v.bitmap); err != nil {
			return fmt.Errorf("install snapshot: chunk %d, version %d: %w", v.id, v.from, err)
		}
		return nil
	}
	started, fresh := map[uint64]bool{}, map[uint64]bool{}
	var zeros []byte
	for {
		f, err := next()
		if errors.Is(err, io.EOF) {
			return seal()
		}
		if err != nil {
			return fmt.Errorf("receive snapshot: %w", err)
		}
		id := f.GetChunkId()
		if !listed[id] {
			return fmt.Errorf("%w: piece of unlisted chunk %d", ErrSnapshotRefused, id)
		}
		if open != nil && (open.id != id || f.GetVersionFrom() != open.from || f.GetVersionBitmap() != nil) {
			if err := seal(); err != nil {
				return err
			}
		}
		switch {
		case f.GetAbsent():
			if err := c.store.Delete(id); err != nil {
				return fmt.Errorf("install snapshot: delete chunk %d: %w", id, err)
			}
			delete(held, id)
			started[id] = true
		case f.GetVersionBitmap() != nil:
			if !started[id] || !held[id] {
				return fmt.Errorf("%w: version of chunk %d before its data", ErrSnapshotRefused, id)
			}
			var absent []byte
			if b := f.GetVersionAbsent(); len(b) > 0 {
				absent = b
			}
			if err := c.store.BeginKept(id, f.GetVersionFrom(), f.GetVersionTo(), absent); err != nil {
				return fmt.Errorf("install snapshot: chunk %d: %w", id, err)
			}
			open = &version{id: id, from: f.GetVersionFrom(), bitmap: f.GetVersionBitmap()}
		case f.GetVersionFrom() != 0:
			if open == nil {
				return fmt.Errorf("%w: page of version %d of chunk %d outside it", ErrSnapshotRefused, f.GetVersionFrom(), id)
			}
			if err := c.store.WriteKept(id, open.from, f.GetData(), int64(f.GetOffset())); err != nil {
				return fmt.Errorf("install snapshot: chunk %d, version %d: %w", id, open.from, err)
			}
		default:
			if !started[id] {
				started[id] = true
				if fresh[id], err = c.store.ResetChunk(id, created[id], owned[id]); err != nil {
					return fmt.Errorf("install snapshot: chunk %d: %w", id, err)
				}
				held[id] = true
			}
			if n := f.GetZeroLength(); n > 0 {
				if fresh[id] {
					continue // a new chunk reads as zeros already
				}
				if uint64(len(zeros)) < n {
					zeros = make([]byte, n)
				}
				if err := c.store.WriteAt(id, zeros[:n], int64(f.GetOffset())); err != nil {
					return fmt.Errorf("install snapshot: zero chunk %d: %w", id, err)
				}
				continue
			}
			if err := c.store.WriteAt(id, f.GetData(), int64(f.GetOffset())); err != nil {
				return fmt.Errorf("install snapshot: write chunk %d: %w", id, err)
			}
		}
	}
}

// snapshotPersisted runs on the apply worker (smMu held) once Raft adopted a
// snapshot and the WAL recorded it: the state machine is at its index.
func (c *Copyset) snapshotPersisted(s *raftpb.Snapshot) {
	md := s.GetMetadata()
	if md.GetIndex() > c.sm.applied {
		c.sm.applied, c.sm.appliedTerm = md.GetIndex(), md.GetTerm()
		c.applied.Store(md.GetIndex())
	}
	c.sm.confState = md.GetConfState()
	c.sm.confEpoch = c.installEpoch.Load()
	c.confEpoch.Store(c.sm.confEpoch)
	var reqs []byte
	if p := c.installDedup.Load(); p != nil {
		reqs = *p
	}
	t, err := decodeDedupTable(reqs) // checked when the install was received
	if err != nil {
		c.fail(fmt.Errorf("snapshot %d: %w", md.GetIndex(), err))
		return
	}
	c.sm.dedup = t
	if err := c.checkpointLocked(); err != nil {
		c.log.Error("checkpoint after snapshot", "err", err)
		return
	}
	if err := c.clearInstalling(); err != nil {
		c.log.Warn("remove the snapshot install marker (the next start removes it)", "err", err)
	}
}

// installMarker is the file in a copyset's directory that records a
// snapshot install under way: its index, in decimal.
const installMarker = "installing"

// ErrInstallInterrupted is why a replica whose snapshot install was cut
// short by a crash starts broken: its chunk files mix the state before the
// install and the snapshot's, which replaying its log cannot reconcile. It
// is rebuilt from its peers.
var ErrInstallInterrupted = errors.New("copyset: snapshot install interrupted")

// markInstalling durably records that the install of the snapshot at idx
// begins, before any chunk file changes.
func (c *Copyset) markInstalling(idx uint64) error {
	return fsutil.WriteFileAtomic(filepath.Join(c.dir, installMarker), strconv.AppendUint(nil, idx, 10), 0o644)
}

// clearInstalling removes the marker once the state machine's checkpoint
// is at or past the install.
func (c *Copyset) clearInstalling() error {
	err := os.Remove(filepath.Join(c.dir, installMarker))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return fsutil.SyncDir(c.dir)
}

// checkInstall looks for an install marker at open, with applied the index
// the replica's state machine is recorded at (its checkpoint, or an install
// its WAL recorded as complete): an install at or below it finished, and
// the marker goes; one above it was interrupted.
func checkInstall(dir string, applied uint64) error {
	path := filepath.Join(dir, installMarker)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	idx, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || idx > applied {
		return fmt.Errorf("%w: snapshot at index %s, state machine at %d", ErrInstallInterrupted, strings.TrimSpace(string(b)), applied)
	}
	if err := os.Remove(path); err != nil {
		return err
	}
	return fsutil.SyncDir(dir)
}
