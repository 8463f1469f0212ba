package client

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/wire"
)

// Extent is a run of a volume's bytes that are all allocated or all holes.
type Extent struct {
	Length int64
	Hole   bool // never written (or unmapped): reads as zeros
}

// Bounds of one Map call: the segments it looks up at the MDS and the
// chunks it asks chunkservers about (the extents may end before the range
// asked for; the caller asks again from where they end).
const (
	mapMaxSegments = 16
	mapMaxChunks   = 4096
)

// Map describes [off, off+length) as extents of data and holes, at chunk
// granularity: a chunk that exists (was written and not deleted since,
// as its copyset's leader says) is data, even where only part of it was
// written; a chunk that does not, or lies in a segment the MDS never
// allocated, is a hole (it reads as zeros and holds no storage). A
// clone's chunk that does not exist reads from its source: it is data
// where the source's is, down the chain of sources. A snapshot handle
// maps the chunks as they were when the snapshot was taken. A whole chunk
// unmapped is a hole again, unless a snapshot or a clone's source needs
// it (then it is kept, zeroed, and counts as data). Which chunks exist is
// never cached: every call asks each copyset's leader, once per
// MaxChunksExist chunks (a chunkserver too old to answer has all its
// chunks counted as data); segments are looked up as reads look them up
// (through the handle's cache). At most mapMaxSegments segments and
// mapMaxChunks chunks are looked at per call. NBD's base:allocation,
// iSCSI's GET LBA STATUS and image copies use it to skip what was never
// written.
func (v *Volume) Map(ctx context.Context, off, length int64) ([]Extent, error) {
	if err := v.usable(false); err != nil {
		return nil, err
	}
	if err := v.check(off, length); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	end := min(off+length, (off/v.segSize+mapMaxSegments)*v.segSize, (off/v.chunkSize+mapMaxChunks)*v.chunkSize)
	first := off / v.chunkSize
	data, err := v.chunkData(ctx, first, (end-1)/v.chunkSize-first+1)
	if len(data) == 0 {
		return nil, fmt.Errorf("map %s at %d: %w", v.name, off, err)
	}
	// err with some data: what is known so far.
	end = min(end, (first+int64(len(data)))*v.chunkSize)
	var out []Extent
	for k, d := range data {
		lo := max(off, (first+int64(k))*v.chunkSize)
		hi := min(end, (first+int64(k)+1)*v.chunkSize)
		if i := len(out) - 1; i >= 0 && out[i].Hole == !d {
			out[i].Length += hi - lo
		} else {
			out = append(out, Extent{Length: hi - lo, Hole: !d})
		}
	}
	return out, nil
}

// chunkData reports which of count chunks of the volume, from its chunk
// number first (offset / chunk size), may hold data read through this
// handle: chunks that exist here, and where they do not and the handle
// reads a clone's source, chunks the source's chunkData finds. The answer
// may be shorter than count, with the error that stopped it (a segment
// lookup failing after the first); empty with the error when nothing
// could be told.
func (v *Volume) chunkData(ctx context.Context, first, count int64) ([]bool, error) {
	data := make([]bool, count)
	perSeg := v.segSize / v.chunkSize
	var refs []*mdspb.ChunkRef
	var at []int // index in data of each of refs
	var stop error
	for k := int64(0); k < count; {
		seg := (first + k) / perSeg
		n := min(count-k, perSeg-(first+k)%perSeg)
		chunks, err := v.r.segment(ctx, seg, false)
		switch {
		case errors.Is(err, errUnallocated):
		case err != nil:
			data, stop = data[:k], err
		default:
			for i := range n {
				refs = append(refs, chunks[(first+k+i)%perSeg])
				at = append(at, int(k+i))
			}
		}
		if stop != nil {
			break
		}
		k += n
	}
	if len(data) == 0 {
		return nil, stop
	}
	exists, err := v.r.chunksExist(ctx, refs)
	if err != nil {
		return nil, err
	}
	for i, e := range exists {
		data[at[i]] = e
	}
	// Where a clone has no chunk it reads its source (as readPiece).
	src := v.source()
	if src == nil || (src.flattened && v.snap == 0) {
		return data, stop
	}
	lo, hi := -1, -1
	for k, d := range data {
		if !d && (first+int64(k))*v.chunkSize < src.size {
			if lo < 0 {
				lo = k
			}
			hi = k
		}
	}
	if lo < 0 {
		return data, stop
	}
	parent, err := v.parentFor(ctx, src)
	if err != nil {
		return nil, err
	}
	if parent.chunkSize != v.chunkSize {
		// Not a geometry the cluster makes: every chunk may hold data.
		for k := lo; k <= hi; k++ {
			data[k] = true
		}
		return data, stop
	}
	pdata, err := parent.chunkData(ctx, first+int64(lo), int64(hi-lo+1))
	if len(pdata) == 0 {
		return nil, err
	}
	if len(pdata) < hi-lo+1 {
		data, stop = data[:lo+len(pdata)], err
	}
	for i, d := range pdata {
		data[lo+i] = data[lo+i] || d
	}
	return data, stop
}

// chunksExist asks the copysets' leaders which of the chunks exist (in
// the handle's snapshot, for a snapshot handle): one request per copyset
// and MaxChunksExist chunks, concurrently within the handle's bound of
// chunk requests in flight.
func (r *router) chunksExist(ctx context.Context, refs []*mdspb.ChunkRef) ([]bool, error) {
	v := r.v
	type batch struct {
		refs []*mdspb.ChunkRef
		at   []int
	}
	var batches []*batch
	open := map[csKey]*batch{}
	for i, ref := range refs {
		k := csKey{ref.GetCopyset().GetLogicalPoolId(), ref.GetCopyset().GetCopysetId()}
		b := open[k]
		if b == nil || len(b.refs) == chunkpb.MaxChunksExist {
			b = &batch{}
			open[k] = b
			batches = append(batches, b)
		}
		b.refs, b.at = append(b.refs, ref), append(b.at, i)
	}
	out := make([]bool, len(refs))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(v.ctx, cancel)()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	fail := func(err error) {
		mu.Lock()
		if first == nil {
			first = err
		}
		mu.Unlock()
		cancel()
	}
	for _, b := range batches {
		if !v.takeSlot(ctx) {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-v.sem }()
			ids := make([]uint64, len(b.refs))
			for i, ref := range b.refs {
				ids[i] = ref.GetChunkId()
			}
			cs := b.refs[0].GetCopyset()
			var exists []bool
			_, err := r.call(ctx, cs, func(ctx context.Context, cl chunkIO) (outcome, error) {
				resp, err := cl.ChunksExist(ctx, &chunkpb.ChunksExistRequest{
					Copyset: cs, ChunkIds: ids, VolumeId: v.id, Epoch: v.Epoch(), SnapshotSn: v.snap,
				})
				exists = resp.GetExists()
				if wire.IsUnknownMethod(err) {
					// A chunkserver older than this client: any of
					// the chunks may hold data.
					exists = make([]bool, len(ids))
					for i := range exists {
						exists[i] = true
					}
					return outcome{status: chunkpb.Status_STATUS_OK}, nil
				}
				return outcome{resp.GetStatus(), resp.GetLeader(), resp.GetMessage()}, err
			})
			switch {
			case err != nil:
				fail(err)
			case len(exists) != len(ids):
				fail(fmt.Errorf("copyset %s answered for %d of %d chunks", cs.Name(), len(exists), len(ids)))
			default:
				for i, e := range exists {
					out[b.at[i]] = e
				}
			}
		}()
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		first = ctx.Err()
		if v.closed.Load() {
			first = ErrClosed
		}
	}
	return out, first
}
