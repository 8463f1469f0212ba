package chunkserver

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/internal/geometry"
	"cairn.io/cairn/internal/wire"
)

// chunkService serves chunk IO. Every outcome the chunkserver decides is a
// Status in the response; gRPC errors are left to the transport.
type chunkService struct {
	chunkpb.UnimplementedChunkServiceServer
	s *Server
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// reqError is a refusal with its status and message.
type reqError struct {
	status chunkpb.Status
	msg    string
	leader *chunkpb.LeaderHint
}

// errWouldBlock is what a request served on its connection's reader
// (wire.Inline) answers where it would have to wait: the handler (ReadChunk,
// the one method registered inline) turns it into wire.ErrWouldBlock, and
// the wire server serves the request again on a goroutine of its own.
var errWouldBlock = &reqError{status: chunkpb.Status_STATUS_OVERLOAD, msg: "would block the connection"}

func refuse(st chunkpb.Status, format string, args ...any) *reqError {
	return &reqError{status: st, msg: fmt.Sprintf(format, args...)}
}

// lookup finds the copyset a request names.
func (s *Server) lookup(ref *commonpb.CopysetRef, chunk uint64) (*copyset.Copyset, *reqError) {
	if ref == nil {
		return nil, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "request names no copyset")
	}
	if chunk == 0 {
		return nil, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "request names no chunk (chunk id 0)")
	}
	id := copyset.MakeGroupID(ref.GetLogicalPoolId(), ref.GetCopysetId())
	c, err := s.engine.Get(id)
	if err != nil {
		return nil, refuse(chunkpb.Status_STATUS_COPYSET_NOTEXIST, "copyset %s is not hosted on chunkserver %d", id, s.id.ChunkServerID)
	}
	return c, nil
}

// checkRange validates an IO range inside a chunk.
func (s *Server) checkRange(off, length uint64, what string) *reqError {
	bs, cs := uint64(s.geom.BlockSize), uint64(s.geom.ChunkSize)
	switch {
	case length == 0:
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "%s of 0 bytes", what)
	case off%bs != 0 || length%bs != 0:
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "%s at offset %d, length %d is not aligned to %d bytes", what, off, length, bs)
	case off >= cs || length > cs-off:
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "%s at offset %d, length %d runs past the end of the %d-byte chunk", what, off, length, cs)
	case length > uint64(s.cfg.MaxIOSize):
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "%s of %d bytes is larger than the limit of %d", what, length, s.cfg.MaxIOSize)
	}
	return nil
}

// leaderHint names the copyset's leader for a redirect.
func (s *Server) leaderHint(c *copyset.Copyset) *chunkpb.LeaderHint {
	l := c.Leader()
	if l == 0 {
		return nil
	}
	addr := s.res.cached(l)
	if addr == "" {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		addr, _ = s.res.Resolve(ctx, l)
		cancel()
	}
	return &chunkpb.LeaderHint{ChunkserverId: l, Address: addr}
}

func (s *Server) notLeader(c *copyset.Copyset) *reqError {
	e := refuse(chunkpb.Status_STATUS_REDIRECTED, "chunkserver %d does not lead copyset %s", s.id.ChunkServerID, c.ID())
	e.leader = s.leaderHint(c)
	if e.leader == nil {
		e.status = chunkpb.Status_STATUS_UNAVAILABLE
		e.msg = fmt.Sprintf("copyset %s has no leader right now", c.ID())
	}
	return e
}

// fromCopysetErr maps a copyset error to a refusal.
func (s *Server) fromCopysetErr(c *copyset.Copyset, err error) *reqError {
	switch {
	case errors.Is(err, copyset.ErrNotLeader):
		return s.notLeader(c)
	case errors.Is(err, datastore.ErrChunkNotExist):
		return refuse(chunkpb.Status_STATUS_CHUNK_NOTEXIST, "chunk does not exist")
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled), errors.Is(err, copyset.ErrProposalLost),
		errors.Is(err, copyset.ErrReadTimeout), errors.Is(err, copyset.ErrStopped), errors.Is(err, copyset.ErrBroken):
		return refuse(chunkpb.Status_STATUS_UNAVAILABLE, "copyset %s: %v", c.ID(), err)
	case errors.Is(err, copyset.ErrTooLarge), errors.Is(err, datastore.ErrInvalidRange), errors.Is(err, copyset.ErrInvalidArgument):
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "%v", err)
	case errors.Is(err, datastore.ErrNoSpace), errors.Is(err, chunkfilepool.ErrPoolEmpty):
		return refuse(chunkpb.Status_STATUS_NOSPACE, "%v", err)
	default:
		return refuse(chunkpb.Status_STATUS_INTERNAL_ERROR, "copyset %s: %v", c.ID(), err)
	}
}

// enter admits a chunk request (see admit) and finds its copyset; release
// ends the admission.
func (s *Server) enter(ctx context.Context, ref *commonpb.CopysetRef, chunk uint64) (*copyset.Copyset, func(), *reqError) {
	release, e := s.admit(ctx)
	if e != nil {
		return nil, nil, e
	}
	c, e := s.lookup(ref, chunk)
	if e != nil {
		release()
		return nil, nil, e
	}
	return c, release, nil
}

// hasRoomForNewChunk reports whether a write creating a chunk may go ahead:
// the pool keeps a reserve for the WAL unless it can still grow.
func (s *Server) hasRoomForNewChunk() bool {
	st := s.pool.Stats()
	return st.Clean+st.Formatting > s.cfg.SpaceReserveChunks || st.Limit == ""
}

// chunkInspector is what the chunk service reads from a copyset's chunk
// store beyond the copyset's own needs: a chunk's metadata, whether it
// exists (now or in a snapshot) and its checksum. The stores this
// chunkserver opens (datastore.Store) provide it.
type chunkInspector interface {
	Info(chunk uint64) (datastore.ChunkInfo, error)
	Exists(chunk, snap uint64) (bool, error)
	Hash(chunk uint64, off, length int64) (uint32, error)
	HashSnapshots(chunk uint64, off, length int64, snaps []uint64) (uint32, error)
}

var _ chunkInspector = (*datastore.Store)(nil)

// inspector returns the copyset's store as a chunkInspector.
func inspector(c *copyset.Copyset) (chunkInspector, bool) {
	ci, ok := c.Store().(chunkInspector)
	return ci, ok
}

func chunkExists(c *copyset.Copyset, chunk uint64) bool {
	ds, ok := inspector(c)
	if !ok {
		return true
	}
	_, err := ds.Info(chunk)
	return !errors.Is(err, datastore.ErrChunkNotExist)
}

func (cs *chunkService) WriteChunk(ctx context.Context, req *chunkpb.WriteChunkRequest) (*chunkpb.WriteChunkResponse, error) {
	s := cs.s
	start := time.Now()
	idx, e := s.writeChunk(ctx, req)
	s.m.observe("write", start, statusOf(e), len(req.GetData())+len(req.GetFill()))
	resp := &chunkpb.WriteChunkResponse{AppliedIndex: idx}
	if e != nil {
		resp.Status, resp.Message, resp.Leader = e.status, e.msg, e.leader
	}
	return resp, nil
}

func (s *Server) writeChunk(ctx context.Context, req *chunkpb.WriteChunkRequest) (uint64, *reqError) {
	c, release, e := s.enter(ctx, req.GetCopyset(), req.GetChunkId())
	if e != nil {
		return 0, e
	}
	defer release()
	if req.GetClone() {
		if e := s.checkCloneWrite(req); e != nil {
			return 0, e
		}
	} else if len(req.GetFill()) > 0 {
		return 0, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "a fill on a write that is not a clone's")
	} else if e := s.checkRange(req.GetOffset(), uint64(len(req.GetData())), "write"); e != nil {
		return 0, e
	}
	if req.GetVolumeId() == 0 {
		return 0, refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "write names no volume")
	}
	if !c.IsLeader() {
		return 0, s.notLeader(c)
	}
	if !chunkExists(c, req.GetChunkId()) && !s.hasRoomForNewChunk() {
		return 0, refuse(chunkpb.Status_STATUS_NOSPACE, "no chunk file left for a new chunk on chunkserver %d", s.id.ChunkServerID)
	}
	wctx, cancel := s.bounded(ctx)
	defer cancel()
	p, e := s.propose(c, req.GetVolumeId(), req.GetEpoch(), func(fence copyset.Fence) (*copyset.Proposal, error) {
		seq := copyset.Seq{SN: req.GetSn(), Keep: req.GetKeep()}
		if req.GetClone() {
			return c.ProposeCloneWrite(wctx, fence, clientRequest(req.GetRequest()), req.GetChunkId(), req.GetVolumeId(), req.GetEpoch(), seq,
				int64(req.GetOffset()), req.GetData(), req.GetFill(), int64(req.GetFillOffset()))
		}
		return c.ProposeSeqWrite(wctx, fence, clientRequest(req.GetRequest()), req.GetChunkId(), req.GetVolumeId(), req.GetEpoch(), seq, int64(req.GetOffset()), req.GetData())
	})
	if e != nil {
		return 0, e
	}
	idx, err := p.Wait(wctx)
	if err != nil {
		return 0, s.fromCopysetErr(c, err)
	}
	return idx, nil
}

// checkCloneWrite validates the ranges of a clone's write: the data (which
// may be empty) and the fill, whose shape the copyset checks further.
func (s *Server) checkCloneWrite(req *chunkpb.WriteChunkRequest) *reqError {
	data, fill := uint64(len(req.GetData())), uint64(len(req.GetFill()))
	if data == 0 && fill == 0 {
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "clone write with neither data nor fill")
	}
	if data > 0 {
		if e := s.checkRange(req.GetOffset(), data, "write"); e != nil {
			return e
		}
	}
	if fill > 0 {
		unit := uint64(geometry.CopyUnit(s.geom.ChunkSize, s.geom.MetaPageSize, s.geom.BlockSize))
		if fill > uint64(s.cfg.MaxIOSize)+2*unit {
			return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "fill of %d bytes is larger than the limit of %d", fill, uint64(s.cfg.MaxIOSize)+2*unit)
		}
		if off := req.GetFillOffset(); off%unit != 0 || off >= uint64(s.geom.ChunkSize) || fill > uint64(s.geom.ChunkSize)-off {
			return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "fill at offset %d, length %d is not whole %d-byte pages inside the chunk", off, fill, unit)
		}
	}
	return nil
}

// propose queues a proposal through f, handing it a fence that checks the
// epoch lease and the volume epoch under the fencing lock: the proposal is
// queued before that lock is released, so an UpdateEpoch either precedes the
// check or follows the proposal into the log. The copyset takes its share of
// the byte budget before the fence, so no wait lies between the check and
// the queueing.
func (s *Server) propose(c *copyset.Copyset, volume, epoch uint64, f func(copyset.Fence) (*copyset.Proposal, error)) (*copyset.Proposal, *reqError) {
	var refused *reqError
	fence := func() (func(), error) {
		release, err := s.epochs.fence(volume, epoch)
		if err != nil {
			refused = s.epochRefusal(err)
			return nil, err
		}
		return release, nil
	}
	p, err := f(fence)
	if refused != nil {
		return nil, refused
	}
	if err != nil {
		return nil, s.fromCopysetErr(c, err)
	}
	return p, nil
}

func (cs *chunkService) ReadChunk(ctx context.Context, req *chunkpb.ReadChunkRequest) (*chunkpb.ReadChunkResponse, error) {
	s := cs.s
	start := time.Now()
	data, absent, e := s.readChunk(ctx, req)
	if e == errWouldBlock {
		return nil, wire.ErrWouldBlock
	}
	s.m.observe("read", start, statusOf(e), len(data))
	resp := &chunkpb.ReadChunkResponse{Data: data, Absent: absent}
	if e != nil {
		resp.Status, resp.Message, resp.Leader, resp.Data, resp.Absent = e.status, e.msg, e.leader, nil, nil
	}
	return resp, nil
}

// readChunk reads from the leader; absent marks the pages of a clone's
// chunk that read from the clone's source (at the snapshot, for a
// snapshot read).
func (s *Server) readChunk(ctx context.Context, req *chunkpb.ReadChunkRequest) (data, absent []byte, e *reqError) {
	c, release, e := s.enter(ctx, req.GetCopyset(), req.GetChunkId())
	if e != nil {
		return nil, nil, e
	}
	defer release()
	if e := s.checkRange(req.GetOffset(), req.GetLength(), "read"); e != nil {
		return nil, nil, e
	}
	if req.GetEpoch() != 0 {
		var release func()
		var err error
		if wire.Inline(ctx) {
			var decided bool
			if release, decided, err = s.epochs.tryFence(req.GetVolumeId(), req.GetEpoch()); !decided {
				return nil, nil, errWouldBlock
			}
		} else {
			release, err = s.epochs.fence(req.GetVolumeId(), req.GetEpoch())
		}
		if err != nil {
			return nil, nil, s.epochRefusal(err)
		}
		release()
	}
	if !c.IsLeader() {
		return nil, nil, s.notLeader(c)
	}
	rctx, cancel := s.bounded(ctx)
	defer cancel()
	if wire.Inline(ctx) {
		if req.GetSnapshotSn() != 0 {
			// A snapshot read may wait for a write's copy on write
			// (a new version file, synced).
			return nil, nil, errWouldBlock
		}
		rctx = copyset.WithoutWaiting(rctx)
	}
	buf := make([]byte, req.GetLength())
	var err error
	if snap := req.GetSnapshotSn(); snap != 0 {
		absent, err = c.ReadSnapshot(rctx, req.GetChunkId(), int64(req.GetOffset()), buf, snap)
	} else {
		absent, err = c.ReadOwned(rctx, req.GetChunkId(), int64(req.GetOffset()), buf)
	}
	if errors.Is(err, copyset.ErrWouldWait) {
		return nil, nil, errWouldBlock
	}
	if err != nil {
		return nil, nil, s.fromCopysetErr(c, err)
	}
	return buf, absent, nil
}

func (cs *chunkService) DeleteChunk(ctx context.Context, req *chunkpb.DeleteChunkRequest) (*chunkpb.DeleteChunkResponse, error) {
	s := cs.s
	start := time.Now()
	e := s.deleteChunk(ctx, req)
	s.m.observe("delete", start, statusOf(e), 0)
	resp := &chunkpb.DeleteChunkResponse{}
	if e != nil {
		resp.Status, resp.Message, resp.Leader = e.status, e.msg, e.leader
	}
	return resp, nil
}

func (s *Server) deleteChunk(ctx context.Context, req *chunkpb.DeleteChunkRequest) *reqError {
	c, release, e := s.enter(ctx, req.GetCopyset(), req.GetChunkId())
	if e != nil {
		return e
	}
	defer release()
	if !c.IsLeader() {
		return s.notLeader(c)
	}
	wctx, cancel := s.bounded(ctx)
	defer cancel()
	p, e := s.propose(c, req.GetVolumeId(), req.GetEpoch(), func(fence copyset.Fence) (*copyset.Proposal, error) {
		seq := copyset.Seq{SN: req.GetSn(), Keep: req.GetKeep()}
		if req.GetClone() {
			return c.ProposeCloneZero(wctx, fence, clientRequest(req.GetRequest()), req.GetChunkId(), req.GetVolumeId(), req.GetEpoch(), seq)
		}
		return c.ProposeSeqDelete(wctx, fence, clientRequest(req.GetRequest()), req.GetChunkId(), req.GetVolumeId(), req.GetEpoch(), seq)
	})
	if e != nil {
		return e
	}
	if _, err := p.Wait(wctx); err != nil {
		return s.fromCopysetErr(c, err)
	}
	return nil
}

// TrimChunk drops what a volume's live snapshots no longer read of a
// chunk's kept versions, through the copyset's log.
func (cs *chunkService) TrimChunk(ctx context.Context, req *chunkpb.TrimChunkRequest) (*chunkpb.TrimChunkResponse, error) {
	s := cs.s
	start := time.Now()
	e := s.trimChunk(ctx, req)
	s.m.observe("trim", start, statusOf(e), 0)
	resp := &chunkpb.TrimChunkResponse{}
	if e != nil {
		resp.Status, resp.Message, resp.Leader = e.status, e.msg, e.leader
	}
	return resp, nil
}

func (s *Server) trimChunk(ctx context.Context, req *chunkpb.TrimChunkRequest) *reqError {
	c, release, e := s.enter(ctx, req.GetCopyset(), req.GetChunkId())
	if e != nil {
		return e
	}
	defer release()
	if !c.IsLeader() {
		return s.notLeader(c)
	}
	wctx, cancel := s.bounded(ctx)
	defer cancel()
	p, err := c.ProposeTrim(wctx, nil, req.GetChunkId(), req.GetVolumeId(), 0, req.GetLive(), req.GetBound())
	if err != nil {
		return s.fromCopysetErr(c, err)
	}
	if _, err := p.Wait(wctx); err != nil {
		return s.fromCopysetErr(c, err)
	}
	return nil
}

func (cs *chunkService) GetChunkInfo(ctx context.Context, req *chunkpb.GetChunkInfoRequest) (*chunkpb.GetChunkInfoResponse, error) {
	s := cs.s
	start := time.Now()
	resp, e := s.chunkInfo(ctx, req)
	s.m.observe("info", start, statusOf(e), 0)
	if e != nil {
		resp.Status, resp.Message, resp.Leader = e.status, e.msg, e.leader
	}
	return resp, nil
}

// chunkInfo reads a chunk's metadata, from the leader once it may serve
// reads, or from any replica when the request says so.
func (s *Server) chunkInfo(ctx context.Context, req *chunkpb.GetChunkInfoRequest) (*chunkpb.GetChunkInfoResponse, *reqError) {
	resp := &chunkpb.GetChunkInfoResponse{}
	c, release, e := s.enter(ctx, req.GetCopyset(), req.GetChunkId())
	if e != nil {
		return resp, e
	}
	defer release()
	if !req.GetAnyReplica() {
		rctx, cancel := s.bounded(ctx)
		err := c.WaitReadable(rctx)
		cancel()
		if err != nil {
			return resp, s.fromCopysetErr(c, err)
		}
	}
	resp.AppliedIndex = c.AppliedIndex()
	ds, ok := inspector(c)
	if !ok {
		return resp, refuse(chunkpb.Status_STATUS_INTERNAL_ERROR, "chunk store does not report chunk info")
	}
	info, err := ds.Info(req.GetChunkId())
	switch {
	case errors.Is(err, datastore.ErrChunkNotExist):
		return resp, refuse(chunkpb.Status_STATUS_CHUNK_NOTEXIST, "chunk does not exist")
	case err != nil:
		return resp, refuse(chunkpb.Status_STATUS_INTERNAL_ERROR, "chunk %d info: %v", req.GetChunkId(), err)
	}
	resp.Exists, resp.Size, resp.Sn, resp.CreatedSn = true, uint64(info.Size), info.SN, info.CreatedSN
	for _, v := range info.Versions {
		resp.KeptBytes += uint64(v.Pages) * uint64(v.CopyUnit)
	}
	resp.Clone, resp.OwnedPages = info.Clone, uint64(info.OwnedPages)
	resp.CopyUnit = uint64(geometry.CopyUnit(s.geom.ChunkSize, s.geom.MetaPageSize, s.geom.BlockSize))
	return resp, nil
}

// GetChunkHash answers from this replica, whatever its role, with the
// applied index the hash was taken at.
func (cs *chunkService) GetChunkHash(ctx context.Context, req *chunkpb.GetChunkHashRequest) (*chunkpb.GetChunkHashResponse, error) {
	s := cs.s
	start := time.Now()
	resp, e := s.chunkHash(ctx, req)
	s.m.observe("hash", start, statusOf(e), 0)
	if e != nil {
		resp.Status, resp.Message = e.status, e.msg
	}
	return resp, nil
}

// chunkHash takes a chunk range's CRC32C between two equal readings of the
// applied index, so that it describes exactly that index.
func (s *Server) chunkHash(ctx context.Context, req *chunkpb.GetChunkHashRequest) (*chunkpb.GetChunkHashResponse, *reqError) {
	resp := &chunkpb.GetChunkHashResponse{}
	c, release, e := s.enter(ctx, req.GetCopyset(), req.GetChunkId())
	if e != nil {
		return resp, e
	}
	defer release()
	length := req.GetLength()
	if length == 0 && req.GetOffset() < uint64(s.geom.ChunkSize) {
		length = uint64(s.geom.ChunkSize) - req.GetOffset()
	}
	if e := s.checkRangeNoCap(req.GetOffset(), length); e != nil {
		return resp, e
	}
	ds, ok := inspector(c)
	if !ok {
		return resp, refuse(chunkpb.Status_STATUS_INTERNAL_ERROR, "chunk store does not hash")
	}
	for attempt := 0; ; attempt++ {
		before := c.AppliedIndex()
		sum, err := ds.HashSnapshots(req.GetChunkId(), int64(req.GetOffset()), int64(length), req.GetSnapshots())
		exists := true
		if errors.Is(err, datastore.ErrChunkNotExist) {
			// Zeros, now and in every snapshot.
			sum, err, exists = zeroCRC(length*uint64(1+len(req.GetSnapshots()))), nil, false
		}
		if err != nil {
			return resp, refuse(chunkpb.Status_STATUS_INTERNAL_ERROR, "hash chunk %d: %v", req.GetChunkId(), err)
		}
		if c.AppliedIndex() == before || attempt == 20 || ctx.Err() != nil {
			resp.Crc32C, resp.Exists, resp.AppliedIndex = sum, exists, before
			if c.AppliedIndex() != before {
				return resp, refuse(chunkpb.Status_STATUS_UNAVAILABLE, "copyset kept applying while the chunk was hashed; retry when writes pause")
			}
			return resp, nil
		}
	}
}

func (s *Server) checkRangeNoCap(off, length uint64) *reqError {
	bs, cs := uint64(s.geom.BlockSize), uint64(s.geom.ChunkSize)
	if off%bs != 0 || length%bs != 0 || off >= cs || length > cs-off {
		return refuse(chunkpb.Status_STATUS_INVALID_REQUEST, "range at offset %d, length %d is not an aligned range of the %d-byte chunk", off, length, cs)
	}
	return nil
}

// zeroCRC is the CRC32C of n zero bytes: a missing chunk reads as zeros.
func zeroCRC(n uint64) uint32 {
	var zero [64 << 10]byte
	crc := uint32(0)
	for n > 0 {
		k := min(n, uint64(len(zero)))
		crc = crc32.Update(crc, castagnoli, zero[:k])
		n -= k
	}
	return crc
}

func (cs *chunkService) UpdateEpoch(ctx context.Context, req *chunkpb.UpdateEpochRequest) (*chunkpb.UpdateEpochResponse, error) {
	s := cs.s
	if req.GetVolumeId() == 0 {
		return &chunkpb.UpdateEpochResponse{Status: chunkpb.Status_STATUS_INVALID_REQUEST, Message: "no volume id"}, nil
	}
	cur, err := s.epochs.raise(req.GetVolumeId(), req.GetEpoch())
	if err != nil {
		return &chunkpb.UpdateEpochResponse{Status: chunkpb.Status_STATUS_INTERNAL_ERROR, Message: err.Error(), Epoch: cur}, nil
	}
	s.log.Info("volume epoch updated", "volume", req.GetVolumeId(), "epoch", cur)
	return &chunkpb.UpdateEpochResponse{Epoch: cur}, nil
}

// clientRequest converts the request's identity for the copyset.
func clientRequest(r *chunkpb.ClientRequest) copyset.ClientRequest {
	return copyset.ClientRequest{Client: r.GetClientId(), Seq: r.GetSeq(), Low: r.GetLowSeq()}
}

func statusOf(e *reqError) chunkpb.Status {
	if e == nil {
		return chunkpb.Status_STATUS_OK
	}
	return e.status
}
