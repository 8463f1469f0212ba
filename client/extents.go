package client

import (
	"context"
	"fmt"
)

// Extent is a run of a volume's bytes that are all allocated or all holes.
type Extent struct {
	Length int64
	Hole   bool // never allocated: reads as zeros
}

// Map describes [off, off+length) as extents of allocated data and holes,
// at segment granularity: a segment the MDS never allocated is a hole (it
// reads as zeros and holds no storage); an allocated segment counts as data
// even where its chunks were never written. It looks up at most a few
// segments per call (the extents may end before off+length; ask again from
// where they end), with the same cache and MDS calls as reads; a clone's
// segment is a hole only where its source's is too. NBD's
// base:allocation and image copies use it to skip what was never written.
func (v *Volume) Map(ctx context.Context, off, length int64) ([]Extent, error) {
	if err := v.usable(false); err != nil {
		return nil, err
	}
	if err := v.check(off, length); err != nil {
		return nil, err
	}
	const maxLookups = 16 // bound the MDS calls one request can cause
	var out []Extent
	for lookups := 0; length > 0 && lookups < maxLookups; lookups++ {
		seg := off / v.segSize
		n := min(length, (seg+1)*v.segSize-off)
		// A clone's segment is a hole only where its source's is too.
		hole, err := v.holeAt(ctx, seg)
		if err != nil && !hole {
			if len(out) > 0 {
				return out, nil // what is known so far
			}
			return nil, fmt.Errorf("map %s at %d: %w", v.name, off, err)
		}
		if k := len(out) - 1; k >= 0 && out[k].Hole == hole {
			out[k].Length += n
		} else {
			out = append(out, Extent{Length: n, Hole: hole})
		}
		off, length = off+n, length-n
	}
	return out, nil
}
