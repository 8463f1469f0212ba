package copyset

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
)

// snapshotPiece is the size of the chunk-file pieces a snapshot streams.
//
// An install only overwrites ranges (explicit zero ranges included) and
// deletes unlisted chunks at the end, so that an interrupted install leaves a
// replica that replaying its log repairs (see the package doc). Two rules keep
// that true:
//
//   - no entry is applied while an install writes (the install holds the
//     state machine), and
//   - after a complete install at index s, data entries at or below s are
//     skipped: the chunk files already hold states at or after s.
const snapshotPiece = 256 << 10

// startSnapshotSend runs on the Raft worker when Raft wants to send a
// snapshot to a follower.
func (c *Copyset) startSnapshotSend(m *raftpb.Message) {
	to := m.GetTo()
	if _, busy := c.snapSending[to]; busy {
		return // the transfer under way reports to Raft when it ends
	}
	idx := m.GetSnapshot().GetMetadata().GetIndex()
	if cs := m.GetSnapshot().GetMetadata().GetConfState(); !slices.Contains(cs.GetVoters(), to) && !slices.Contains(cs.GetLearners(), to) &&
		!slices.Contains(cs.GetVotersOutgoing(), to) && !slices.Contains(cs.GetLearnersNext(), to) {
		// The last checkpoint predates the member (just added): the
		// member would refuse this snapshot after receiving all of it.
		// Take a checkpoint, which records a snapshot that includes it,
		// and let Raft ask again.
		c.log.Debug("snapshot predates the member it is for; checkpointing first", "to", to, "index", idx)
		c.requestCheckpoint()
		c.call(func() { c.rn.ReportSnapshot(to, raft.SnapshotFailure) })
		return
	}
	c.snapSending[to] = idx
	epoch, reqs := c.snapConfEpoch.Load(), c.snapDedup
	c.e.wg.Add(1)
	go func() {
		defer c.e.wg.Done()
		err := c.sendSnapshot(m, epoch, reqs)
		status := raft.SnapshotFinish
		if err != nil {
			status = raft.SnapshotFailure
			c.e.snapshots.sendFailed.Add(1)
			c.log.Warn("snapshot transfer failed", "to", to, "index", idx, "err", err)
		} else {
			c.e.snapshots.sent.Add(1)
			c.log.Info("snapshot sent", "to", to, "index", idx)
		}
		c.call(func() {
			delete(c.snapSending, to)
			c.rn.ReportSnapshot(to, status)
		})
	}()
}

func (c *Copyset) sendSnapshot(m *raftpb.Message, epoch uint64, reqs []byte) error {
	select {
	case c.e.snapSem <- struct{}{}:
		defer func() { <-c.e.snapSem }()
	case <-c.e.stopped:
		return ErrStopped
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.e.stopped:
			cancel()
		case <-ctx.Done():
		}
	}()
	raw, err := proto.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode snapshot message: %w", err)
	}
	stream, err := c.e.transport.OpenSnapshot(ctx, m.GetTo())
	if err != nil {
		return err
	}
	ids := c.store.List()
	header := &transportpb.SnapshotChunk{Group: uint64(c.id), RaftMessage: raw, ConfEpoch: epoch, AppliedRequests: reqs}
	size := c.e.cfg.ChunkSize
	for _, id := range ids {
		header.Files = append(header.Files, &transportpb.SnapshotFile{ChunkId: id, Size: uint64(size)})
	}
	if err := stream.Send(header); err != nil {
		stream.Abort()
		return fmt.Errorf("send snapshot header: %w", err)
	}
	buf := make([]byte, snapshotPiece)
	zero := make([]byte, snapshotPiece)
	for _, id := range ids {
		for off := int64(0); off < size; off += snapshotPiece {
			n := min(int64(snapshotPiece), size-off)
			piece := &transportpb.SnapshotChunk{ChunkId: id, Offset: uint64(off)}
			if err := c.store.ReadAt(id, buf[:n], off); err != nil {
				if slices.Contains(c.store.List(), id) {
					stream.Abort()
					return fmt.Errorf("read chunk %d for snapshot: %w", id, err)
				}
				// Deleted while being sent: it is absent at the leader.
				piece.Offset, piece.ZeroLength = 0, uint64(size)
				if err := stream.Send(piece); err != nil {
					stream.Abort()
					return fmt.Errorf("send snapshot: %w", err)
				}
				break
			}
			if bytes.Equal(buf[:n], zero[:n]) {
				piece.ZeroLength = uint64(n)
			} else {
				if err := c.e.limiter.wait(ctx, int(n)); err != nil {
					stream.Abort()
					return err
				}
				piece.Data = buf[:n]
			}
			if err := stream.Send(piece); err != nil {
				stream.Abort()
				return fmt.Errorf("send snapshot: %w", err)
			}
		}
	}
	return stream.Finish()
}

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

	held := make(map[uint64]bool)
	for _, id := range c.store.List() {
		held[id] = true
	}
	listed := make(map[uint64]bool, len(header.GetFiles()))
	for _, f := range header.GetFiles() {
		listed[f.GetChunkId()] = true
	}
	var zeros []byte
	for {
		f, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("receive snapshot: %w", err)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		id := f.GetChunkId()
		if !listed[id] {
			return fmt.Errorf("%w: piece of unlisted chunk %d", ErrSnapshotRefused, id)
		}
		switch {
		case f.GetZeroLength() > 0:
			if !held[id] {
				continue // an absent chunk reads as zeros already
			}
			if f.GetOffset() == 0 && f.GetZeroLength() >= uint64(c.e.cfg.ChunkSize) {
				if err := c.store.Delete(id); err != nil {
					return fmt.Errorf("install snapshot: delete chunk %d: %w", id, err)
				}
				delete(held, id)
				continue
			}
			if uint64(len(zeros)) < f.GetZeroLength() {
				zeros = make([]byte, f.GetZeroLength())
			}
			if err := c.store.WriteAt(id, zeros[:f.GetZeroLength()], int64(f.GetOffset())); err != nil {
				return fmt.Errorf("install snapshot: zero chunk %d: %w", id, err)
			}
		default:
			if err := c.store.WriteAt(id, f.GetData(), int64(f.GetOffset())); err != nil {
				return fmt.Errorf("install snapshot: write chunk %d: %w", id, err)
			}
			held[id] = true
		}
	}
	for id := range held {
		if !listed[id] {
			if err := c.store.Delete(id); err != nil {
				return fmt.Errorf("install snapshot: delete chunk %d: %w", id, err)
			}
		}
	}
	if err := c.store.Sync(); err != nil {
		// Pages of the chunk files may be lost (a failed writeback is
		// reported once), mixing states the log cannot repair.
		err = fmt.Errorf("install snapshot: sync: %w", err)
		c.fail(err)
		return err
	}
	if _, err := decodeDedupTable(header.GetAppliedRequests()); err != nil {
		return fmt.Errorf("%w: %v", ErrSnapshotRefused, err)
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
	}
}
