package nemesis

import (
	"context"
	"errors"
	"fmt"
	"time"

	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/poll"
)

// libVolume is the one place that calls package client's IO methods, so
// that their signatures changing (a context parameter) is an edit here.
type libVolume struct{ v *client.Volume }

// openLib opens a volume with the client library: for writing (fencing any
// earlier writer) or read-only.
func openLib(ctx context.Context, mds, vol string, readOnly bool) (*libVolume, error) {
	v, err := client.OpenWithOptions(ctx, []string{mds}, vol, client.Options{
		ReadOnly: readOnly, ClientName: fmt.Sprintf("nemesis-%s-ro=%v", vol, readOnly),
		RetryTimeout: libRetryTimeout, Logger: quietLogger()})
	if err != nil {
		return nil, err
	}
	return &libVolume{v: v}, nil
}

// libRetryTimeout bounds the client library's own retries of one IO.
const libRetryTimeout = 20 * time.Second

// WriteAt writes p at off; the library stops retrying when ctx ends.
func (l *libVolume) WriteAt(ctx context.Context, p []byte, off int64) error {
	_, err := l.v.WriteAt(ctx, p, off)
	return err
}

// ReadAt reads len(p) bytes at off.
func (l *libVolume) ReadAt(ctx context.Context, p []byte, off int64) error {
	_, err := l.v.ReadAt(ctx, p, off)
	return err
}

// Flush waits for writes in flight.
func (l *libVolume) Flush(ctx context.Context) error { return l.v.Flush(ctx) }

// Close closes the handle.
func (l *libVolume) Close() error { return l.v.Close() }

// isPermanent reports whether a handle can no longer do IO.
func isPermanent(err error) bool {
	return errors.Is(err, client.ErrFenced) || errors.Is(err, client.ErrClosed)
}

// readFinal reads the given blocks of vol through a read-only handle (which
// fences no one), retrying each until ctx ends, and records every read in
// h as an operation of client.
func readFinal(ctx context.Context, h *History, mds, vol string, keys []Key, clientID int) (map[Key]uint64, error) {
	var v *libVolume
	err := poll.Until(ctx, "a read-only handle on "+vol, func() error {
		octx, cancel := context.WithTimeout(ctx, opTimeout)
		defer cancel()
		var err error
		v, err = openLib(octx, mds, vol, true)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer v.Close()
	out := map[Key]uint64{}
	buf := make([]byte, BlockSize)
	for _, k := range keys {
		err := poll.Until(ctx, "the final read of "+k.String(), func() error {
			call := h.Now()
			if err := v.ReadAt(ctx, buf, k.Block*BlockSize); err != nil {
				return err
			}
			val := ValueOf(buf)
			h.Add(Op{Client: clientID, Key: k, Value: val, Call: call, Return: h.Now()})
			out[k] = val
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}
