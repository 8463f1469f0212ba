package copyset

import "context"

// writeWait proposes a chunk write outside any client session and waits for
// it to be applied.
func writeWait(ctx context.Context, c *Copyset, chunk, volume, epoch uint64, off int64, data []byte) (uint64, error) {
	p, err := c.ProposeWrite(ctx, nil, ClientRequest{}, chunk, volume, epoch, off, data)
	if err != nil {
		return 0, err
	}
	return p.Wait(ctx)
}

// deleteWait proposes a chunk delete and waits for it to be applied.
func deleteWait(ctx context.Context, c *Copyset, chunk, volume, epoch uint64) (uint64, error) {
	p, err := c.ProposeDelete(ctx, nil, ClientRequest{}, chunk, volume, epoch)
	if err != nil {
		return 0, err
	}
	return p.Wait(ctx)
}
