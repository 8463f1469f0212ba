package client

import (
	"bytes"
	"context"
	"fmt"
)

// EachChangedBlock reads src in blocks of size block and calls f with each
// block that differs from the same range of base (every block when base is
// nil), and whether it is all zeros; past base's end, base reads as zeros.
// progress, if not nil, is called with the bytes of src done after each
// block. It is how exports, rollbacks and restores find what to write.
func EachChangedBlock(ctx context.Context, src, base *Volume, block int64, progress func(int64),
	f func(off int64, data []byte, zeros bool) error) error {
	size := src.Size()
	cur, prev, zero := make([]byte, block), make([]byte, block), make([]byte, block)
	for off := int64(0); off < size; off += block {
		n := min(block, size-off)
		if _, err := src.ReadAt(ctx, cur[:n], off); err != nil {
			return fmt.Errorf("read %s at %d: %w", src.Name(), off, err)
		}
		if base != nil {
			clear(prev[:n])
			if m := min(n, base.Size()-off); m > 0 {
				if _, err := base.ReadAt(ctx, prev[:m], off); err != nil {
					return fmt.Errorf("read %s at %d: %w", base.Name(), off, err)
				}
			}
		}
		if base == nil || !bytes.Equal(cur[:n], prev[:n]) {
			if err := f(off, cur[:n], bytes.Equal(cur[:n], zero[:n])); err != nil {
				return err
			}
		}
		if progress != nil {
			progress(off + n)
		}
	}
	return nil
}
