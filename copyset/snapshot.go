package copyset

import (
	"bytes"
	"context"
	"fmt"
	"slices"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/copyset/transport"
)

// snapshotPiece is the size of the chunk-file pieces a snapshot streams.
//
// A snapshot lists the chunks and streams each chunk's data, then the
// versions it keeps for volume snapshots, read while writes go on (fuzzy):
// the receiver then replays the log from the snapshot's index, and after a
// complete install at index s, data entries at or below s are skipped (the
// chunk files already hold states at or after s). No entry is applied
// while an install writes (the install holds the state machine). An install
// cut short leaves chunk files that replaying the log cannot repair (copies
// on write are not idempotent): the replica fails, or, after a crash, starts
// broken (install.go), and is rebuilt from its peers.
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
		created, _ := c.store.CreatedSN(id) // a chunk deleted meanwhile is sent as absent
		// A clone chunk's owned pages before its data: the receiver never
		// finds a page owned whose fill its data does not hold (a write
		// replayed over it would skip the fill).
		owned, _ := c.store.Owned(id)
		header.Files = append(header.Files, &transportpb.SnapshotFile{ChunkId: id, Size: uint64(size), CreatedSn: created, Owned: owned})
	}
	if err := stream.Send(header); err != nil {
		stream.Abort()
		return fmt.Errorf("send snapshot header: %w", err)
	}
	buf := make([]byte, snapshotPiece)
	zero := make([]byte, snapshotPiece)
	for _, id := range ids {
		gone := false
		for off := int64(0); off < size; off += snapshotPiece {
			n := min(int64(snapshotPiece), size-off)
			piece := &transportpb.SnapshotChunk{ChunkId: id, Offset: uint64(off)}
			if err := c.store.ReadAt(id, buf[:n], off); err != nil {
				if slices.Contains(c.store.List(), id) {
					stream.Abort()
					return fmt.Errorf("read chunk %d for snapshot: %w", id, err)
				}
				// Deleted while being sent: it is absent at the leader.
				piece.Offset, piece.ZeroLength, piece.Absent = 0, uint64(size), true
				if err := stream.Send(piece); err != nil {
					stream.Abort()
					return fmt.Errorf("send snapshot: %w", err)
				}
				gone = true
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
		if !gone {
			if err := c.sendKept(ctx, stream, id, buf); err != nil {
				stream.Abort()
				return err
			}
		}
	}
	return stream.Finish()
}

// sendKept sends the versions a chunk keeps for snapshots, after its data:
// a frame with each version's bounds and bitmap, then the pages it holds.
// Listed after the data, so that the receiver, which replays the log from
// the snapshot's index, never finds a page kept that its data does not
// already reflect (see datastore's transfer.go).
func (c *Copyset) sendKept(ctx context.Context, stream *transport.SnapshotStream, id uint64, buf []byte) error {
	type kept struct {
		from, to       uint64
		unit           int64
		bitmap, absent []byte
	}
	var vs []kept
	err := c.store.EachKept(id, func(from, to uint64, unit int64, bitmap, absent []byte) {
		vs = append(vs, kept{from, to, unit, bitmap, absent})
	})
	if err != nil {
		if slices.Contains(c.store.List(), id) {
			return fmt.Errorf("list kept versions of chunk %d: %w", id, err)
		}
		return nil // deleted meanwhile: the next snapshot says so
	}
	size := c.e.cfg.ChunkSize
	for _, v := range vs {
		head := &transportpb.SnapshotChunk{ChunkId: id, VersionFrom: v.from, VersionTo: v.to, VersionUnit: v.unit, VersionBitmap: v.bitmap, VersionAbsent: v.absent}
		if err := stream.Send(head); err != nil {
			return fmt.Errorf("send snapshot: %w", err)
		}
		for page := int64(0); page*v.unit < size; {
			if v.bitmap[page/8]&(1<<(page%8)) == 0 {
				page++
				continue
			}
			// A run of held pages, up to one piece.
			first := page
			for page*v.unit < size && v.bitmap[page/8]&(1<<(page%8)) != 0 && (page-first+1)*v.unit <= int64(len(buf)) {
				page++
			}
			off := first * v.unit
			n := min(page*v.unit, size) - off
			if err := c.store.ReadKept(id, v.from, buf[:n], off); err != nil {
				return fmt.Errorf("read kept version %d of chunk %d: %w", v.from, id, err)
			}
			if err := c.e.limiter.wait(ctx, int(n)); err != nil {
				return err
			}
			if err := stream.Send(&transportpb.SnapshotChunk{ChunkId: id, VersionFrom: v.from, Offset: uint64(off), Data: buf[:n]}); err != nil {
				return fmt.Errorf("send snapshot: %w", err)
			}
		}
	}
	return nil
}
