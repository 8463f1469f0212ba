package chunkserver

import (
	"context"
	"time"

	"cairn.io/cairn/api/chunkpb"
)

// ChunksExist answers which of a copyset's chunks exist, from the leader
// once it may serve reads (as ReadChunk), from the chunk store's index: no
// chunk data is read.
func (cs *chunkService) ChunksExist(ctx context.Context, req *chunkpb.ChunksExistRequest) (*chunkpb.ChunksExistResponse, error) {
	s := cs.s
	start := time.Now()
	exists, e := s.chunksExist(ctx, req)
	s.m.observe("exists", start, statusOf(e), 0)
	resp := &chunkpb.ChunksExistResponse{Exists: exists}
	if e != nil {
		resp.Status, resp.Message, resp.Leader, resp.Exists = e.status, e.msg, e.leader, nil
	}
	return resp, nil
}

func (s *Server) chunksExist(ctx context.Context, req *chunkpb.ChunksExistRequest) ([]bool, *reqError) {
	ids := req.GetChunkIds()
	switch {
	case len(ids) == 0:
		return nil, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "request names no chunk")
	case len(ids) > chunkpb.MaxChunksExist:
		return nil, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "request names %d chunks, more than the limit of %d", len(ids), chunkpb.MaxChunksExist)
	}
	c, release, e := s.enter(ctx, req.GetCopyset(), ids[0])
	if e != nil {
		return nil, e
	}
	defer release()
	for _, id := range ids {
		if id == 0 {
			return nil, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "request names no chunk (chunk id 0)")
		}
	}
	if req.GetEpoch() != 0 {
		release, err := s.epochs.fence(req.GetVolumeId(), req.GetEpoch())
		if err != nil {
			return nil, s.epochRefusal(err)
		}
		release()
	}
	if !c.IsLeader() {
		return nil, s.notLeader(c)
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	err := c.WaitReadable(rctx)
	cancel()
	if err != nil {
		return nil, s.fromCopysetErr(c, err)
	}
	out := make([]bool, len(ids))
	ds, ok := inspector(c)
	if !ok {
		// A store that cannot tell: any chunk may hold data.
		for i := range out {
			out[i] = true
		}
		return out, nil
	}
	for i, id := range ids {
		if out[i], err = ds.Exists(id, req.GetSnapshotSn()); err != nil {
			return nil, s.fromCopysetErr(c, err)
		}
	}
	return out, nil
}
