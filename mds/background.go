package mds

import (
	"context"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
)

// startBackground runs the leader's background loop: resuming logical pools
// left CREATING, expiring sessions, and freeing the chunks of deleted
// volumes. All of it resumes after a restart or failover because its work
// list is in etcd.
func (l *leaderState) startBackground() {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		t := time.NewTicker(l.s.cfg.BackgroundInterval)
		defer t.Stop()
		for {
			l.runBackground(l.ctx)
			select {
			case <-l.ctx.Done():
				return
			case <-t.C:
			case <-l.kick:
			}
		}
	}()
}

func (l *leaderState) runBackground(ctx context.Context) {
	l.resumePools(ctx)
	if err := l.expireSessions(ctx); err != nil && ctx.Err() == nil {
		l.log.Warn("expire sessions", "err", err)
	}
	if err := l.expireTrash(ctx); err != nil && ctx.Err() == nil {
		l.log.Warn("expire the trash", "err", err)
	}
	if err := l.freeDeletedVolumes(ctx); err != nil && ctx.Err() == nil {
		l.log.Warn("free deleted volumes", "err", err)
	}
	if err := l.trimDeletedSnapshots(ctx); err != nil && ctx.Err() == nil {
		l.log.Warn("finish snapshot deletions", "err", err)
	}
	if err := l.freeShrunkSegments(ctx); err != nil && ctx.Err() == nil {
		l.log.Warn("free the segments of shrunk volumes", "err", err)
	}
	if err := l.releaseFlattenedClones(ctx); err != nil && ctx.Err() == nil {
		l.log.Warn("release flattened clones", "err", err)
	}
}

func (l *leaderState) expireSessions(ctx context.Context) error {
	resp, err := l.st.cli.Get(ctx, l.st.k.sessions(), clientv3.WithPrefix())
	if err != nil {
		return fmt.Errorf("etcd list sessions: %w", err)
	}
	now := time.Now().Unix()
	var ops []clientv3.Op
	for _, kv := range resp.Kvs {
		s := &mdspb.Session{}
		if err := proto.Unmarshal(kv.Value, s); err != nil {
			return fmt.Errorf("decode %s: %w", kv.Key, err)
		}
		if s.ExpiresUnix <= now {
			ops = append(ops, clientv3.OpDelete(string(kv.Key)))
		}
	}
	for start := 0; start < len(ops); start += maxTxnOps {
		if _, err := l.st.txn(ctx, nil, ops[start:min(start+maxTxnOps, len(ops))]...); err != nil {
			return err
		}
	}
	return nil
}

// freeDeletedVolumes frees the chunks of every DELETING volume, segment by
// segment, then removes the volume's records.
func (l *leaderState) freeDeletedVolumes(ctx context.Context) error {
	vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes())
	if err != nil {
		return err
	}
	for _, v := range vols {
		if v.Status != mdspb.VolumeStatus_VOLUME_STATUS_DELETING {
			continue
		}
		if err := l.freeVolume(ctx, v); err != nil {
			return fmt.Errorf("volume %q (id %d): %w", v.Name, v.Id, err)
		}
	}
	return nil
}

func (l *leaderState) freeVolume(ctx context.Context, v *mdspb.Volume) error {
	segs, err := list[mdspb.Segment](ctx, l.st, l.st.k.volumeSegments(v.Id))
	if err != nil {
		return err
	}
	for _, seg := range segs {
		if err := l.freeSegment(ctx, v, seg); err != nil {
			return fmt.Errorf("segment at %d: %w", seg.Offset, err)
		}
		if _, err := l.st.txn(ctx, nil, clientv3.OpDelete(l.st.k.segment(v.Id, seg.Offset/l.consts.SegmentSize))); err != nil {
			return err
		}
		l.mu.Lock()
		l.mu.segments--
		l.mu.Unlock()
	}
	if _, err := l.st.txn(ctx, nil, clientv3.OpDelete(l.st.k.volume(v.Id)),
		clientv3.OpDelete(l.st.k.volumeSessions(v.Id), clientv3.WithPrefix())); err != nil {
		return err
	}
	l.log.Info("volume deleted", "volume", v.Name, "id", v.Id, "segments", len(segs))
	return nil
}

// freeSegment deletes every chunk of a segment on its copyset, a few at a
// time.
func (l *leaderState) freeSegment(ctx context.Context, v *mdspb.Volume, seg *mdspb.Segment) error {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
		sem      = make(chan struct{}, 8)
	)
	for _, ref := range seg.Chunks {
		wg.Add(1)
		sem <- struct{}{}
		go func(ref *mdspb.ChunkRef) {
			defer wg.Done()
			defer func() { <-sem }()
			if err := l.deleteChunk(ctx, v, ref); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}(ref)
	}
	wg.Wait()
	return firstErr
}

// deleteChunk deletes one chunk through its copyset's leader. A chunk that
// does not exist counts as deleted.
func (l *leaderState) deleteChunk(ctx context.Context, v *mdspb.Volume, ref *mdspb.ChunkRef) error {
	req := &chunkpb.DeleteChunkRequest{Copyset: ref.Copyset, ChunkId: ref.ChunkId, VolumeId: v.Id, Epoch: v.Epoch}
	err := l.onChunkLeader(ctx, ref, func(ctx context.Context, cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, string, error) {
		resp, err := cl.DeleteChunk(ctx, req)
		return resp.GetStatus(), resp.GetLeader(), resp.GetMessage(), err
	})
	if err != nil {
		return fmt.Errorf("delete chunk %d: %w", ref.ChunkId, err)
	}
	return nil
}
