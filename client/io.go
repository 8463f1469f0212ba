package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// piece is the part of an IO that falls in one chunk, small enough for one
// chunk request.
type piece struct {
	seg      int64 // segment index
	chunkIdx int   // chunk index within the segment
	off      int64 // offset within the chunk
	buf      []byte
}

// pieces splits [off, off+len(p)) at chunk bounds and at the piece size.
func (v *Volume) pieces(p []byte, off int64) []piece {
	var out []piece
	for len(p) > 0 {
		inChunk := off % v.chunkSize
		n := min(int64(len(p)), v.chunkSize-inChunk, v.pieceSize-inChunk%v.pieceSize)
		out = append(out, piece{
			seg:      off / v.segSize,
			chunkIdx: int((off % v.segSize) / v.chunkSize),
			off:      inChunk,
			buf:      p[:n],
		})
		p, off = p[n:], off+n
	}
	return out
}

func (v *Volume) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > v.Size() || off+n < off {
		return fmt.Errorf("%w: [%d, %d) of a %d-byte volume", ErrOutOfRange, off, off+n, v.Size())
	}
	if off%v.blockSize != 0 || n%v.blockSize != 0 {
		return fmt.Errorf("%w: offset %d, length %d, block size %d", ErrUnaligned, off, n, v.blockSize)
	}
	return nil
}

// run runs f on every piece concurrently (bounded by MaxInflight) and
// returns the first error. The pieces' context ends when the caller's ctx
// ends, when the volume is closed, or when a piece failed.
func (v *Volume) run(caller context.Context, ps []piece, f func(ctx context.Context, p piece) error) error {
	ctx, cancel := context.WithCancel(caller)
	defer cancel()
	defer context.AfterFunc(v.ctx, cancel)()
	if len(ps) == 1 {
		return v.runPiece(ctx, ps[0], f)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for _, p := range ps {
		if !v.takeSlot(ctx) {
			break
		}
		wg.Add(1)
		go func(p piece) {
			defer wg.Done()
			defer func() { <-v.sem }()
			if err := v.runPiece(ctx, p, f); err != nil {
				mu.Lock()
				if first == nil || errors.Is(err, ErrFenced) {
					first = err
				}
				mu.Unlock()
				cancel()
			}
		}(p)
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		// Pieces were left unsent because the caller gave up or the
		// volume was closed.
		first = caller.Err()
		if first == nil || v.closed.Load() {
			first = ErrClosed
		}
	}
	return first
}

// runPiece runs f on one piece once the piece's bytes fit in the volume's
// budget of bytes in flight (Options.MaxInflightBytes).
// takeSlot takes one of the handle's slots for a chunk request in flight
// (v.sem), and reports false, holding none, once ctx has ended. A slot
// taken as ctx ends is given back: select picks at random among ready
// cases, and a slot kept by a caller that gives up is lost for good.
func (v *Volume) takeSlot(ctx context.Context) bool {
	select {
	case v.sem <- struct{}{}:
		if ctx.Err() != nil {
			<-v.sem
			return false
		}
		return true
	case <-ctx.Done():
		return false
	}
}

func (v *Volume) runPiece(ctx context.Context, p piece, f func(ctx context.Context, p piece) error) error {
	n := int64(len(p.buf))
	if n > 0 {
		if err := v.budget.acquire(ctx, n); err != nil {
			return err
		}
		defer v.budget.release(n)
	}
	return f(ctx, p)
}

func (v *Volume) finish(err error) error {
	if err != nil {
		v.stats.errors.Add(1)
		if v.closed.Load() && errors.Is(err, context.Canceled) {
			return ErrClosed
		}
	}
	return err
}

// ReadAt reads len(p) bytes at off. Never-written ranges read as zeros.
// When ctx ends first, ReadAt stops retrying and returns ctx's error; p then
// holds nothing the caller may rely on.
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := v.usable(false); err != nil {
		return 0, err
	}
	if err := v.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	err := v.run(ctx, v.pieces(p, off), func(ctx context.Context, pc piece) error {
		return v.r.readPiece(ctx, pc)
	})
	if err = v.finish(err); err != nil {
		return 0, fmt.Errorf("read %s at %d (%d bytes): %w", v.name, off, len(p), err)
	}
	v.stats.reads.Add(1)
	v.stats.readBytes.Add(uint64(len(p)))
	return len(p), nil
}

// WriteAt writes p at off. It returns once the data is durable on a quorum
// of every copyset it touches.
//
// When ctx ends first, WriteAt stops retrying and returns ctx's error
// promptly (as it returns ErrClosed when the volume is closed). The outcome
// of such a write is unknown: any of its pieces may have been applied, or
// none. What is guaranteed is that nothing of it is proposed after a write
// the caller issues once WriteAt has returned: by then every piece's chunk
// request has been answered or cancelled; the cancellation reaches the
// chunkserver on the same connection ahead of any later request, and the
// chunkserver checks a request's context under the copyset lock it proposes
// under, so it never proposes a request it has seen cancelled. A caller that
// waits for a cancelled WriteAt to return may therefore write the same
// blocks again and know the old data will not land on top.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := v.usable(true); err != nil {
		return 0, err
	}
	if err := v.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	err := v.run(ctx, v.pieces(p, off), func(ctx context.Context, pc piece) error {
		return v.r.writePiece(ctx, pc)
	})
	if err = v.finish(err); err != nil {
		return 0, fmt.Errorf("write %s at %d (%d bytes): %w", v.name, off, len(p), err)
	}
	v.stats.writes.Add(1)
	v.stats.writtenBytes.Add(uint64(len(p)))
	return len(p), nil
}

// UnmapAt discards [off, off+length): the range reads as zeros afterwards.
// Whole chunks are deleted (their files go back to the pools); partial
// chunks are overwritten with zeros; never-allocated segments cost nothing.
// A cancelled ctx has the meaning it has for WriteAt: the range may be
// partly unmapped, and nothing of it is unmapped after UnmapAt returned.
func (v *Volume) UnmapAt(ctx context.Context, off, length int64) error {
	if err := v.usable(true); err != nil {
		return err
	}
	if err := v.check(off, length); err != nil {
		return err
	}
	var jobs []piece
	zeros := make([]byte, v.pieceSize)
	for end := off + length; off < end; {
		inChunk := off % v.chunkSize
		n := min(end-off, v.chunkSize-inChunk)
		pc := piece{seg: off / v.segSize, chunkIdx: int((off % v.segSize) / v.chunkSize), off: inChunk}
		if inChunk == 0 && n == v.chunkSize {
			jobs = append(jobs, pc) // nil buf: delete the chunk
		} else {
			for k := int64(0); k < n; {
				m := min(n-k, v.pieceSize-(inChunk+k)%v.pieceSize)
				jobs = append(jobs, piece{seg: pc.seg, chunkIdx: pc.chunkIdx, off: inChunk + k, buf: zeros[:m]})
				k += m
			}
		}
		off += n
	}
	err := v.run(ctx, jobs, func(ctx context.Context, pc piece) error {
		return v.r.unmapPiece(ctx, pc)
	})
	if err = v.finish(err); err != nil {
		return fmt.Errorf("unmap %s: %w", v.name, err)
	}
	v.stats.unmaps.Add(1)
	return nil
}
