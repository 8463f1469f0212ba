package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"syscall"

	"cairn.io/cairn/client"
)

// clientOpener opens volumes for writing through the client library.
func clientOpener(mdsAddrs []string, name string, logger *slog.Logger) func(context.Context, string) (Volume, error) {
	return func(ctx context.Context, volume string) (Volume, error) {
		v, err := client.OpenWithOptions(ctx, mdsAddrs, volume, client.Options{
			ClientName: name,
			Logger:     logger,
		})
		if err != nil {
			if errors.Is(err, client.ErrNotFound) {
				return nil, fmt.Errorf("%w: %w", ErrUnknownVolume, err)
			}
			return nil, err
		}
		return clientVolume{v}, nil
	}
}

// clientVolume is a client volume whose errors speak the gateway's terms:
// fencing wraps ErrFenced, a full pool wraps ENOSPC (NBD answers NBD_ENOSPC).
type clientVolume struct{ v *client.Volume }

func (c clientVolume) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.v.ReadAt(p, off)
	return n, translate(err)
}

func (c clientVolume) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.v.WriteAt(p, off)
	return n, translate(err)
}

func (c clientVolume) UnmapAt(off, length int64) error { return translate(c.v.UnmapAt(off, length)) }
func (c clientVolume) Flush() error                    { return translate(c.v.Flush()) }
func (c clientVolume) Size() int64                     { return c.v.Size() }
func (c clientVolume) Close() error                    { return c.v.Close() }

// Refresh reads the volume's size from the MDS now (after it grew).
func (c clientVolume) Refresh(ctx context.Context) error { return c.v.Refresh(ctx) }

// Stats are the client library's counters, exported as metrics.
func (c clientVolume) Stats() client.Stats { return c.v.Stats() }

func translate(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, client.ErrFenced):
		return fmt.Errorf("%w: %w", ErrFenced, err)
	case errors.Is(err, client.ErrNoSpace):
		return fmt.Errorf("%w: %w", syscall.ENOSPC, err)
	}
	return err
}
