package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
)

// Clones. A clone's chunks own only the pages written into them; the rest
// reads from the snapshot the clone was made from (its source), which this
// handle opens as a snapshot handle when it first needs it. Writes carry
// the source's content of the pages they cover in part (fill), so that the
// chunkserver can make such a page the chunk's own; an unmap of a whole
// chunk zeroes it instead of deleting it (a missing chunk reads the
// source). Flatten copies what the source holds into the clone; the MDS
// then releases the source a session lease later (once no snapshot of the
// clone taken before the flatten remains), and the clone is a volume like
// any other. A snapshot of a clone reads the source where the clone's
// chunks did not own a page when it was taken; a clone of it reads that
// snapshot, which reads its own source: chains resolve page by page.

// cloneFeature tells the MDS this client reads clones
// (OpenVolumeRequest.features).
const cloneFeature = "clones"

// ErrNotClone is returned by Flatten for a volume that is not a clone.
var ErrNotClone = errors.New("client: volume is not a clone")

// cloneSource is what a handle knows of its volume's source.
type cloneSource struct {
	volume, snapshot string
	volumeID, seq    uint64
	size             int64
	flattened        bool
}

// setSource records the volume's clone source as the MDS last told it
// (nil: not a clone, or released).
func (v *Volume) setSource(cs *mdspb.CloneSource) {
	if cs == nil {
		if old := v.src.Swap(nil); old != nil {
			// Segments a flatten allocated may be cached as never
			// written: ask again.
			if v.r != nil {
				v.r.forgetAbsent()
			}
			v.log.Info("clone released from its source", "source", old.volume+"@"+old.snapshot)
		}
		return
	}
	next := &cloneSource{volume: cs.GetVolume(), snapshot: cs.GetSnapshot(), volumeID: cs.GetVolumeId(), seq: cs.GetSeq(),
		size: int64(cs.GetSize()), flattened: cs.GetFlattenedUnix() != 0}
	if old := v.src.Swap(next); old != nil && !old.flattened && next.flattened {
		// From now on a segment never allocated reads as zeros, not
		// from the source: one the flatten allocated may be cached as
		// never written.
		if v.r != nil {
			v.r.forgetAbsent()
		}
		v.log.Info("clone flattened: writes no longer carry its source's content")
	}
}

// source is the volume's clone source (nil: none).
func (v *Volume) source() *cloneSource { return v.src.Load() }

// Source names the snapshot a clone reads where it was not written
// ("VOLUME@SNAPSHOT"), and whether it was flattened; "" for a volume that
// is not a clone (or whose source was released).
func (v *Volume) Source() (name string, flattened bool) {
	s := v.source()
	if s == nil {
		return "", false
	}
	return s.volume + "@" + s.snapshot, s.flattened
}

// parentHandle is the snapshot handle the clone reads its source through,
// opened on first use.
type parentHandle struct {
	mu sync.Mutex
	h  *Volume
}

func (v *Volume) parentFor(ctx context.Context, src *cloneSource) (*Volume, error) {
	v.parent.mu.Lock()
	defer v.parent.mu.Unlock()
	if h := v.parent.h; h != nil {
		return h, nil
	}
	if v.closed.Load() {
		return nil, ErrClosed
	}
	o := v.opts
	o.Snapshot, o.ReadOnly, o.Node = src.snapshot, true, ""
	o.ClientName = v.opts.ClientName + " (source of " + v.name + ")"
	h, err := OpenWithOptions(ctx, v.mds.Addresses(), src.volume, o)
	if err != nil {
		return nil, fmt.Errorf("open the clone's source %s@%s: %w", src.volume, src.snapshot, err)
	}
	if h.id != src.volumeID || h.snap != src.seq {
		_ = h.Close()
		return nil, fmt.Errorf("%w: the clone's source %s@%s is not the snapshot it was made from (volume %d, sequence number %d)",
			ErrNotFound, src.volume, src.snapshot, src.volumeID, src.seq)
	}
	v.parent.h = h
	return h, nil
}

func (v *Volume) closeParent() {
	v.parent.mu.Lock()
	h := v.parent.h
	v.parent.h = nil
	v.parent.mu.Unlock()
	if h != nil {
		_ = h.Close()
	}
}

// readSource reads len(p) bytes of the source at the volume offset off:
// zeros beyond the source's size, or when there is no source.
func (v *Volume) readSource(ctx context.Context, src *cloneSource, p []byte, off int64) error {
	if src == nil || off >= src.size {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), src.size-off)
	clear(p[n:])
	parent, err := v.parentFor(ctx, src)
	if err != nil {
		return err
	}
	if _, err := parent.ReadAt(ctx, p[:n], off); err != nil {
		return fmt.Errorf("read the clone's source: %w", err)
	}
	return nil
}

// pieceOffset is the volume offset of a piece.
func (v *Volume) pieceOffset(pc piece) int64 {
	return pc.seg*v.segSize + int64(pc.chunkIdx)*v.chunkSize + pc.off
}

// fillAbsent reads from the source the pages of a piece that its chunk
// does not own: bit k of absent stands for the k-th page the piece
// touches.
func (v *Volume) fillAbsent(ctx context.Context, src *cloneSource, pc piece, absent []byte) error {
	first := pc.off / v.unit
	end := pc.off + int64(len(pc.buf))
	base := v.pieceOffset(pc) - pc.off
	for k := int64(0); k < int64(len(absent))*8; {
		if absent[k/8]&(1<<(k%8)) == 0 {
			k++
			continue
		}
		j := k + 1
		for j < int64(len(absent))*8 && absent[j/8]&(1<<(j%8)) != 0 {
			j++
		}
		lo, hi := max((first+k)*v.unit, pc.off), min((first+j)*v.unit, end)
		if lo < hi {
			if err := v.readSource(ctx, src, pc.buf[lo-pc.off:hi-pc.off], base+lo); err != nil {
				return err
			}
		}
		k = j
	}
	return nil
}

// cloneFill returns what a clone's write of a piece carries of its source:
// the source's content of the whole pages the piece covers, from their
// first byte (nil when it covers whole pages only, or once the clone was
// flattened: what its chunks do not own then reads as zeros).
func (v *Volume) cloneFill(ctx context.Context, src *cloneSource, pc piece) (fill []byte, fillOff int64, err error) {
	end := pc.off + int64(len(pc.buf))
	lo, hi := pc.off/v.unit*v.unit, min((end+v.unit-1)/v.unit*v.unit, v.chunkSize)
	if src.flattened || (lo == pc.off && hi == end) {
		return nil, 0, nil
	}
	fill = make([]byte, hi-lo)
	if err := v.readSource(ctx, src, fill, v.pieceOffset(pc)-pc.off+lo); err != nil {
		return nil, 0, err
	}
	return fill, lo, nil
}

// Flatten copies into the clone every page of its source that its chunks
// do not own yet, then tells the MDS, which releases the source a session
// lease later (then the snapshot may be deleted). Writers may go on
// meanwhile: a page copied never overwrites one the clone wrote. progress,
// when set, is called with the bytes of the source done and the total.
// It returns the bytes copied. A handle opened read-only can flatten.
// Flattening a flattened clone returns at once.
func (v *Volume) Flatten(ctx context.Context, progress func(done, total int64)) (copied int64, err error) {
	if err := v.usable(false); err != nil {
		return 0, err
	}
	src := v.source()
	if src == nil {
		return 0, fmt.Errorf("%w: %s", ErrNotClone, v.name)
	}
	total := min(src.size, v.Size())
	var n atomic.Int64 // bytes copied
	if !src.flattened {
		const batch = 32 // pieces copied concurrently
		var ps []piece
		flush := func(done int64) error {
			err := v.run(ctx, ps, func(ctx context.Context, pc piece) error { return v.r.flattenPiece(ctx, src, pc, &n) })
			ps = ps[:0]
			if err != nil {
				return err
			}
			if progress != nil {
				progress(done, total)
			}
			return nil
		}
		for off := int64(0); off < total; {
			if v.flattenedElsewhere() {
				// Another flatten finished first; going on after the
				// source's release could bring its data back into
				// chunks unmapped since.
				return n.Load(), nil
			}
			if since := time.Since(time.Unix(0, v.confirmed.Load())); since > v.lease/2 {
				// Without the MDS this handle cannot know whether
				// another flatten finished and the source was released
				// (the release also raises the epoch, which refuses
				// fills sent after it).
				if err := v.Refresh(ctx); err != nil {
					return n.Load(), fmt.Errorf("flatten %s: %w: the MDS has not answered for %v: %w", v.name, ErrUnavailable, since.Round(time.Second), err)
				}
				continue
			}
			seg := off / v.segSize
			if v.sourceHole(ctx, src, seg) {
				off = (seg + 1) * v.segSize
				if err := flush(min(off, total)); err != nil {
					return n.Load(), fmt.Errorf("flatten %s: %w", v.name, err)
				}
				continue
			}
			size := min(v.pieceSize, total-off)
			ps = append(ps, piece{seg: seg, chunkIdx: int((off % v.segSize) / v.chunkSize), off: off % v.chunkSize, buf: make([]byte, size)})
			off += size
			if len(ps) == batch || off == total {
				if err := flush(off); err != nil {
					return n.Load(), fmt.Errorf("flatten %s: %w", v.name, err)
				}
			}
		}
		if progress != nil && total == 0 {
			progress(0, 0)
		}
	}
	resp, err := v.mds.Volumes().FlattenVolume(ctx, &mdspb.FlattenVolumeRequest{Name: v.name})
	if err != nil {
		return n.Load(), fmt.Errorf("flatten %s: record it: %w", v.name, err)
	}
	v.setSource(resp.GetVolume().GetCloneSource())
	return n.Load(), nil
}

// flattenedElsewhere reports that the MDS recorded a flatten of the clone
// (or released it) while this handle's flatten runs.
func (v *Volume) flattenedElsewhere() bool {
	s := v.source()
	return s == nil || s.flattened
}

// sourceHole reports a segment the source reads as zeros: nothing to copy.
func (v *Volume) sourceHole(ctx context.Context, src *cloneSource, seg int64) bool {
	parent, err := v.parentFor(ctx, src)
	if err != nil {
		return false // the copy finds out
	}
	hole, err := parent.holeAt(ctx, seg)
	return err == nil && hole
}

// holeAt reports a segment that reads as zeros through this handle: never
// allocated here, and, where the handle reads a source there, a hole of
// the source too (which may be a snapshot of a clone, reading its own
// source: the question goes down the chain).
func (v *Volume) holeAt(ctx context.Context, seg int64) (bool, error) {
	_, err := v.r.segment(ctx, seg, false)
	switch {
	case err == nil:
		return false, nil
	case !errors.Is(err, errUnallocated):
		return false, err
	}
	src := v.source()
	if src == nil || (src.flattened && v.snap == 0) || seg*v.segSize >= src.size {
		return true, nil
	}
	parent, err := v.parentFor(ctx, src)
	if err != nil {
		return false, err
	}
	return parent.holeAt(ctx, seg)
}

// flattenPiece copies the source's pages of one piece that the clone's
// chunk does not own (reading the clone first tells which), as a fill
// alone: pages the clone writes meanwhile are never overwritten.
func (r *router) flattenPiece(ctx context.Context, src *cloneSource, pc piece, copied *atomic.Int64) error {
	v := r.v
	if v.flattenedElsewhere() {
		return nil
	}
	exists, absent, err := r.readOwned(ctx, pc, false)
	if err != nil {
		return err
	}
	if exists && absent == nil {
		return nil // all its own
	}
	if err := v.readSource(ctx, src, pc.buf, v.pieceOffset(pc)); err != nil {
		return err
	}
	if isZero(pc.buf) || v.flattenedElsewhere() {
		return nil // reads as zeros with or without the source; or done elsewhere
	}
	ref, err := r.chunkRef(ctx, pc, true)
	if err != nil {
		return err
	}
	abandoned := false
	_, err = r.call(ctx, ref.GetCopyset(), func(ctx context.Context, cl chunkIO) (outcome, error) {
		epoch := v.volEpoch.Load()
		if v.flattenedElsewhere() {
			// Checked before every attempt: a fill sent after the
			// source's release is refused anyway (the release raises the
			// epoch), one sent before it is harmless.
			abandoned = true
			return outcome{status: chunkpb.Status_STATUS_OK}, nil
		}
		resp, err := cl.WriteChunk(ctx, &chunkpb.WriteChunkRequest{
			Copyset: ref.GetCopyset(), ChunkId: ref.GetChunkId(), VolumeId: v.id, Epoch: epoch,
			Clone: true, Fill: pc.buf, FillOffset: uint64(pc.off),
		})
		out := outcome{resp.GetStatus(), resp.GetLeader(), resp.GetMessage()}
		if err == nil && out.status == chunkpb.Status_STATUS_EPOCH_TOO_OLD {
			// A fill changes nothing a reader sees: it goes on under the
			// volume's new epoch, whoever raised it.
			if rerr := v.learnEpoch(ctx); rerr != nil {
				out.msg = rerr.Error()
			}
			out.status = chunkpb.Status_STATUS_UNAVAILABLE
		}
		return out, err
	})
	if err == nil && !abandoned {
		copied.Add(int64(len(pc.buf)))
	}
	return err
}

// learnEpoch asks the MDS for the volume's current epoch (volEpoch).
func (v *Volume) learnEpoch(ctx context.Context) error {
	resp, err := v.mds.Volumes().RefreshSession(ctx, &mdspb.RefreshSessionRequest{Name: v.name, SessionId: v.sessionID()})
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		}
		return err
	}
	v.noteVolume(resp.GetVolume())
	return nil
}

// noteVolume takes what every handle follows of the volume's record: its
// epoch (the fills of a flatten carry it) and its clone source.
func (v *Volume) noteVolume(vol *mdspb.Volume) {
	// The source first: a flatten that sees the epoch of a release sees
	// the release (it reads the epoch, then checks the source).
	v.setSource(vol.GetCloneSource())
	for {
		cur := v.volEpoch.Load()
		if vol.GetEpoch() <= cur || v.volEpoch.CompareAndSwap(cur, vol.GetEpoch()) {
			break
		}
	}
}

func isZero(b []byte) bool {
	var zero [4096]byte
	for len(b) > 0 {
		n := min(len(b), len(zero))
		if !bytes.Equal(b[:n], zero[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
