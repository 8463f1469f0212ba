package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/wire"
)

// router maps pieces to chunks and copysets and sends chunk requests to
// copyset leaders.
type router struct {
	v *Volume

	segMu    sync.Mutex
	segs     map[int64][]*mdspb.ChunkRef // allocated segments
	absent   map[int64]time.Time         // segments known unallocated, and when
	segCalls map[int64]*segCall          // lookups in flight

	csMu     sync.Mutex
	copysets map[csKey]*csInfo

	conns *wire.Pool // to chunkservers, for chunk IO
}

// chunkIO is the data path of a chunkserver's chunk service.
type chunkIO interface {
	WriteChunk(ctx context.Context, req *chunkpb.WriteChunkRequest) (*chunkpb.WriteChunkResponse, error)
	ReadChunk(ctx context.Context, req *chunkpb.ReadChunkRequest) (*chunkpb.ReadChunkResponse, error)
	DeleteChunk(ctx context.Context, req *chunkpb.DeleteChunkRequest) (*chunkpb.DeleteChunkResponse, error)
}

type csKey struct{ pool, copyset uint32 }

// csInfo is what the client knows of a copyset.
type csInfo struct {
	peers   []*commonpb.Peer
	leader  string // address believed to lead; "" unknown
	fetched time.Time
}

type segCall struct {
	done  chan struct{}
	chunk []*mdspb.ChunkRef
	err   error
	// abandoned: the lookup failed because its caller's context ended.
	abandoned bool
}

func newRouter(v *Volume) *router {
	return &router{
		v: v, segs: map[int64][]*mdspb.ChunkRef{}, absent: map[int64]time.Time{},
		segCalls: map[int64]*segCall{}, copysets: map[csKey]*csInfo{},
		conns: wire.NewPool(wire.ClientOptions{MaxFrame: 16 << 20, Dialer: certs.Dialer(v.opts.TLS, certs.RoleChunkServer)}),
	}
}

func (r *router) close() { r.conns.Close() }

// forgetAbsent drops what is known of unallocated segments (a clone's
// source was released: segments a flatten allocated may be cached as
// never written, which would read zeros from now on).
func (r *router) forgetAbsent() {
	r.segMu.Lock()
	clear(r.absent)
	r.segMu.Unlock()
}

var errUnallocated = errors.New("segment not allocated")

// segment returns the chunks of a segment, allocating it when allocate is
// set. Without allocate, errUnallocated means the range was never written.
func (r *router) segment(ctx context.Context, seg int64, allocate bool) ([]*mdspb.ChunkRef, error) {
	for {
		r.segMu.Lock()
		if c, ok := r.segs[seg]; ok {
			r.segMu.Unlock()
			return c, nil
		}
		// A writer allocates every segment it writes, so its negative
		// cache stays right; a read-only handle asks again after a while,
		// and so does a clone's writer (a flatten allocates too).
		if t, ok := r.absent[seg]; ok && !allocate && ((r.v.Epoch() != 0 && r.v.source() == nil) || time.Since(t) < 2*time.Second) {
			r.segMu.Unlock()
			return nil, errUnallocated
		}
		if call, ok := r.segCalls[seg]; ok {
			r.segMu.Unlock()
			select {
			case <-call.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if call.abandoned {
				continue // its caller gave up; this one has not
			}
			if call.err == nil || !allocate {
				if call.err != nil {
					return nil, call.err
				}
				return call.chunk, nil
			}
			continue // a lookup without allocation found nothing; allocate now
		}
		call := &segCall{done: make(chan struct{})}
		r.segCalls[seg] = call
		r.segMu.Unlock()

		call.chunk, call.err = r.fetchSegment(ctx, seg, allocate)
		// The caller's context ending (its IO was cancelled) says
		// nothing about the segment: callers waiting on this lookup
		// make their own.
		call.abandoned = call.err != nil && ctx.Err() != nil
		r.segMu.Lock()
		delete(r.segCalls, seg)
		switch {
		case call.err == nil:
			r.segs[seg] = call.chunk
			delete(r.absent, seg)
		case errors.Is(call.err, errUnallocated):
			r.absent[seg] = time.Now()
		}
		r.segMu.Unlock()
		close(call.done)
		return call.chunk, call.err
	}
}

func (r *router) fetchSegment(ctx context.Context, seg int64, allocate bool) ([]*mdspb.ChunkRef, error) {
	v := r.v
	resp, err := v.mds.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: v.name, Offset: uint64(seg * v.segSize), Allocate: allocate})
	if err != nil {
		switch status.Code(err) {
		case codes.NotFound:
			if allocate {
				return nil, fmt.Errorf("%w: %v", ErrNotFound, status.Convert(err).Message())
			}
			return nil, errUnallocated
		case codes.ResourceExhausted:
			return nil, fmt.Errorf("%w: %v", ErrNoSpace, status.Convert(err).Message())
		}
		return nil, fmt.Errorf("segment %d: %w", seg, err)
	}
	chunks := resp.GetSegment().GetChunks()
	if int64(len(chunks)) != v.segSize/v.chunkSize {
		return nil, fmt.Errorf("segment %d has %d chunks, want %d", seg, len(chunks), v.segSize/v.chunkSize)
	}
	if allocate {
		v.stats.allocs.Add(1)
	}
	// Learn the segment's copysets in one call.
	var refs []*commonpb.CopysetRef
	seen := map[csKey]bool{}
	r.csMu.Lock()
	for _, c := range chunks {
		k := csKey{c.GetCopyset().GetLogicalPoolId(), c.GetCopyset().GetCopysetId()}
		if r.copysets[k] == nil && !seen[k] {
			seen[k] = true
			refs = append(refs, c.GetCopyset())
		}
	}
	r.csMu.Unlock()
	if len(refs) > 0 {
		_ = r.fetchCopysets(ctx, refs)
	}
	return chunks, nil
}

// fetchCopysets asks the MDS for copysets' members and leaders.
func (r *router) fetchCopysets(ctx context.Context, refs []*commonpb.CopysetRef) error {
	resp, err := r.v.mds.Topology().GetCopysets(ctx, &mdspb.GetCopysetsRequest{Copysets: refs})
	if err != nil {
		return err
	}
	r.csMu.Lock()
	defer r.csMu.Unlock()
	for _, cs := range resp.GetCopysets() {
		info := &csInfo{peers: cs.GetPeers(), fetched: time.Now()}
		for _, p := range cs.GetPeers() {
			if p.GetChunkserverId() == cs.GetLeaderId() {
				info.leader = p.GetAddress()
			}
		}
		r.copysets[csKey{cs.GetId().GetLogicalPoolId(), cs.GetId().GetCopysetId()}] = info
	}
	return nil
}

// target picks the address to send a copyset request to: the known leader,
// or else the members in turn; avoid, when not "", is passed over while
// another member is known (a chunkserver that just gave no answer).
func (r *router) target(ctx context.Context, ref *commonpb.CopysetRef, attempt int, refresh bool, avoid string) (string, error) {
	k := csKey{ref.GetLogicalPoolId(), ref.GetCopysetId()}
	r.csMu.Lock()
	info := r.copysets[k]
	stale := info == nil || (refresh && time.Since(info.fetched) > 200*time.Millisecond)
	r.csMu.Unlock()
	if stale {
		if err := r.fetchCopysets(ctx, []*commonpb.CopysetRef{ref}); err != nil && info == nil {
			return "", err
		}
		r.csMu.Lock()
		info = r.copysets[k]
		r.csMu.Unlock()
		if info == nil {
			return "", fmt.Errorf("copyset %s unknown to the MDS", commonpb.CopysetName(k.pool, k.copyset))
		}
	}
	r.csMu.Lock()
	defer r.csMu.Unlock()
	if info.leader != "" && info.leader != avoid {
		return info.leader, nil
	}
	n := len(info.peers)
	if n == 0 {
		return "", fmt.Errorf("copyset %s has no members", commonpb.CopysetName(k.pool, k.copyset))
	}
	for i := range n {
		if a := info.peers[(attempt+i)%n].GetAddress(); a != avoid {
			return a, nil
		}
	}
	return info.peers[attempt%n].GetAddress(), nil
}

func (r *router) setLeader(ref *commonpb.CopysetRef, addr string) {
	k := csKey{ref.GetLogicalPoolId(), ref.GetCopysetId()}
	r.csMu.Lock()
	if info := r.copysets[k]; info != nil {
		info.leader = addr
	}
	r.csMu.Unlock()
}

func (r *router) client(ctx context.Context, addr string) (chunkIO, error) {
	c, err := r.conns.Get(ctx, addr)
	if err != nil {
		return nil, err
	}
	return chunkpb.WireClient{C: c}, nil
}

// outcome is a chunk request's answer.
type outcome struct {
	status chunkpb.Status
	leader *chunkpb.LeaderHint
	msg    string
}

// suspectFor is how long a request passes over a chunkserver that gave no
// answer: two election timeouts, by when its copysets have a new leader if
// it lost them.
const suspectFor = 2 * time.Second

// call sends one chunk request to its copyset's leader, following
// redirects and retrying transient failures until the retry timeout.
func (r *router) call(ctx context.Context, ref *commonpb.CopysetRef, f func(ctx context.Context, cl chunkIO) (outcome, error)) (chunkpb.Status, error) {
	v := r.v
	deadline := time.Now().Add(v.opts.RetryTimeout)
	backoff := 2 * time.Millisecond
	attemptTimeout := min(v.opts.AttemptTimeout, v.opts.RetryTimeout)
	refresh := false
	var last string
	// A chunkserver that gave no answer (hung, paused, cut off from the
	// client, gone) is passed over for a while: the MDS and the other
	// members may still name it leader until they learn better, and going
	// back to it would cost another attempt timeout while its copyset
	// elects a new leader elsewhere.
	var suspect string
	var suspectUntil time.Time
	// noSpace is the last NOSPACE answer: a full pool is the cause to
	// report even when other failures came in between.
	var noSpace string
	for attempt := 0; ; attempt++ {
		// While the copyset is without a reachable leader, poll briskly:
		// a new one is elected within an election timeout or two.
		maxBackoff := 100 * time.Millisecond
		if v.fenced.Load() {
			return 0, ErrFenced
		}
		v.stats.chunkReqs.Add(1)
		avoid := ""
		if time.Now().Before(suspectUntil) {
			avoid = suspect
		}
		addr, err := r.target(ctx, ref, attempt, refresh, avoid)
		refresh = false
		var out outcome
		refusedEpoch := v.Epoch() // what this attempt carries
		if err == nil {
			rctx, cancel := context.WithTimeout(ctx, attemptTimeout)
			var cl chunkIO
			if cl, err = r.client(rctx, addr); err == nil {
				out, err = f(rctx, cl)
			}
			if err != nil && ctx.Err() == nil && rctx.Err() != nil {
				// No answer in time: the next attempt goes to whoever
				// leads then, and may wait longer.
				attemptTimeout = min(2*attemptTimeout, 10*time.Second, v.opts.RetryTimeout)
			}
			cancel()
		}
		switch {
		case ctx.Err() != nil:
			return 0, ctx.Err()
		case denied(err):
			return 0, fmt.Errorf("%w: %v", ErrDenied, err)
		case err != nil:
			// The chunkserver is unreachable or restarting: forget the
			// leader and ask the members (and the MDS) again.
			last = err.Error()
			r.setLeader(ref, "")
			refresh = true
			if addr != "" {
				suspect, suspectUntil = addr, time.Now().Add(suspectFor)
			}
		case out.status == chunkpb.Status_STATUS_OK || out.status == chunkpb.Status_STATUS_CHUNK_NOTEXIST:
			return out.status, nil
		case out.status == chunkpb.Status_STATUS_REDIRECTED:
			v.stats.redirects.Add(1)
			last = out.msg
			if a := out.leader.GetAddress(); a != "" && a != addr && a != avoid {
				r.setLeader(ref, a)
				if attempt < 3 {
					continue // go straight to the new leader
				}
			} else {
				r.setLeader(ref, "")
				refresh = true
			}
		case out.status == chunkpb.Status_STATUS_EPOCH_TOO_OLD:
			// A snapshot raised the epoch (go on under the new one), or
			// another writer opened the volume (fenced).
			retry, err := v.renew(ctx, refusedEpoch)
			switch {
			case retry:
				continue
			case v.fenced.Load():
				return out.status, ErrFenced
			case err != nil:
				last = fmt.Sprintf("epoch refused, and the MDS cannot say why: %v", err)
			default:
				last = "epoch refused; the MDS knows no newer one yet"
			}
			maxBackoff = 500 * time.Millisecond
		case out.status == chunkpb.Status_STATUS_INVALID_REQUEST:
			return out.status, fmt.Errorf("chunkserver %s refused the request: %s", addr, out.msg)
		case out.status == chunkpb.Status_STATUS_COPYSET_NOTEXIST:
			last = out.msg
			r.setLeader(ref, "")
			refresh = true
		default:
			// UNAVAILABLE (no leader, leader change), OVERLOAD, NOSPACE
			// while a pool formats, INTERNAL_ERROR: wait and retry.
			last = fmt.Sprintf("%v: %s", out.status, out.msg)
			if out.status == chunkpb.Status_STATUS_NOSPACE {
				noSpace = last
			}
			if out.status == chunkpb.Status_STATUS_UNAVAILABLE {
				r.setLeader(ref, "")
				refresh = attempt%4 == 3
			} else {
				maxBackoff = 500 * time.Millisecond // busy: back off further
			}
		}
		if time.Now().After(deadline) {
			if noSpace != "" {
				if noSpace != last {
					return chunkpb.Status_STATUS_NOSPACE, fmt.Errorf("%w: %s (last: %s)", ErrNoSpace, noSpace, last)
				}
				return chunkpb.Status_STATUS_NOSPACE, fmt.Errorf("%w: %s", ErrNoSpace, last)
			}
			return out.status, fmt.Errorf("%w after %v (copyset %s): %s", ErrTimeout, v.opts.RetryTimeout, ref.Name(), last)
		}
		v.stats.retries.Add(1)
		backoff = min(backoff, maxBackoff)
		sleep := backoff/2 + rand.N(backoff/2+1)
		backoff = min(backoff*2, maxBackoff)
		select {
		case <-time.After(sleep):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func (r *router) chunkRef(ctx context.Context, pc piece, allocate bool) (*mdspb.ChunkRef, error) {
	chunks, err := r.segment(ctx, pc.seg, allocate)
	if err != nil {
		return nil, err
	}
	return chunks[pc.chunkIdx], nil
}

func (r *router) writePiece(ctx context.Context, pc piece) error {
	v := r.v
	ref, err := r.chunkRef(ctx, pc, true)
	if err != nil {
		return err
	}
	// A clone's write: the source's content of the pages it covers in
	// part goes with it (clone.go).
	var fill []byte
	var fillOff int64
	src := v.source()
	if src != nil {
		if fill, fillOff, err = v.cloneFill(ctx, src, pc); err != nil {
			return err
		}
	}
	seq := v.reqs.begin()
	defer v.reqs.end(seq)
	_, err = r.call(ctx, ref.GetCopyset(), func(ctx context.Context, cl chunkIO) (outcome, error) {
		w := v.ws.Load()
		resp, err := cl.WriteChunk(ctx, &chunkpb.WriteChunkRequest{
			Copyset: ref.GetCopyset(), ChunkId: ref.GetChunkId(), VolumeId: v.id, Epoch: w.epoch,
			Offset: uint64(pc.off), Data: pc.buf, Request: v.reqs.attempt(seq), Sn: w.sn, Keep: w.keep,
			Clone: src != nil && !src.flattened, Fill: fill, FillOffset: uint64(fillOff),
		})
		return outcome{resp.GetStatus(), resp.GetLeader(), resp.GetMessage()}, err
	})
	return err
}

func (r *router) readPiece(ctx context.Context, pc piece) error {
	v := r.v
	src := v.source()
	if src != nil && src.flattened && v.snap == 0 {
		// Every page the source holds is the clone's own by now: what
		// the chunks do not own reads as zeros (the source may be gone
		// soon after). A snapshot taken before the flatten still reads
		// the source, which stays until no such snapshot remains.
		src = nil
	}
	exists, absent, err := r.readOwned(ctx, pc, false)
	switch {
	case err != nil:
		return err
	case !exists:
		// Never written: zeros, or the source's for a clone.
		return v.readSource(ctx, src, pc.buf, v.pieceOffset(pc))
	case absent != nil && src != nil:
		return v.fillAbsent(ctx, src, pc, absent)
	}
	return nil
}

// readOwned reads a piece from its chunk into pc.buf: exists is false for
// a chunk never written (or a segment never allocated; pc.buf untouched),
// and absent marks the pages a clone's chunk does not own (zeros in
// pc.buf).
func (r *router) readOwned(ctx context.Context, pc piece, allocate bool) (exists bool, absent []byte, err error) {
	v := r.v
	ref, err := r.chunkRef(ctx, pc, allocate)
	if errors.Is(err, errUnallocated) {
		return false, nil, nil
	}
	if err != nil {
		return false, nil, err
	}
	var data []byte
	st, err := r.call(ctx, ref.GetCopyset(), func(ctx context.Context, cl chunkIO) (outcome, error) {
		resp, err := cl.ReadChunk(ctx, &chunkpb.ReadChunkRequest{
			Copyset: ref.GetCopyset(), ChunkId: ref.GetChunkId(), VolumeId: v.id, Epoch: v.Epoch(),
			Offset: uint64(pc.off), Length: uint64(len(pc.buf)), SnapshotSn: v.snap,
		})
		data, absent = resp.GetData(), resp.GetAbsent()
		return outcome{resp.GetStatus(), resp.GetLeader(), resp.GetMessage()}, err
	})
	if err != nil {
		return false, nil, err
	}
	if st == chunkpb.Status_STATUS_CHUNK_NOTEXIST {
		return false, nil, nil
	}
	if len(data) != len(pc.buf) {
		return false, nil, fmt.Errorf("chunk %d returned %d bytes for a %d-byte read", ref.GetChunkId(), len(data), len(pc.buf))
	}
	if pages := (pc.off+int64(len(pc.buf))-1)/v.unit - pc.off/v.unit + 1; absent != nil && int64(len(absent)) != (pages+7)/8 {
		return false, nil, fmt.Errorf("chunk %d marked %d bytes of pages not its own for a read of %d pages", ref.GetChunkId(), len(absent), pages)
	}
	copy(pc.buf, data)
	return true, absent, nil
}

// unmapPiece deletes a whole chunk (nil buf) or zeroes part of one. A
// clone's chunk is zeroed, never deleted: a missing one reads the source
// (so is a segment never allocated).
func (r *router) unmapPiece(ctx context.Context, pc piece) error {
	v := r.v
	src := v.source()
	ref, err := r.chunkRef(ctx, pc, src != nil)
	if errors.Is(err, errUnallocated) {
		return nil // never written: already zeros
	}
	if err != nil {
		return err
	}
	if pc.buf != nil {
		return r.writePiece(ctx, pc)
	}
	seq := v.reqs.begin()
	defer v.reqs.end(seq)
	_, err = r.call(ctx, ref.GetCopyset(), func(ctx context.Context, cl chunkIO) (outcome, error) {
		// With the sequence numbers of this attempt: a chunk a snapshot
		// may read is zeroed through copy on write, not deleted.
		w := v.ws.Load()
		resp, err := cl.DeleteChunk(ctx, &chunkpb.DeleteChunkRequest{
			Copyset: ref.GetCopyset(), ChunkId: ref.GetChunkId(), VolumeId: v.id, Epoch: w.epoch,
			Request: v.reqs.attempt(seq), Sn: w.sn, Keep: w.keep, Clone: src != nil,
		})
		return outcome{resp.GetStatus(), resp.GetLeader(), resp.GetMessage()}, err
	})
	return err
}
