package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"syscall"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/client"
)

// clientOpener opens volumes for writing through the client library.
func clientOpener(cfg Config, logger *slog.Logger) func(context.Context, string) (blockdev.Device, error) {
	return func(ctx context.Context, name string) (blockdev.Device, error) {
		volume, snapshot := SplitSnapshot(name)
		v, err := client.OpenWithOptions(ctx, cfg.MDSAddrs, volume, client.Options{
			ClientName:       cfg.ClientName,
			MaxInflightBytes: cfg.VolumeMaxInflightBytes,
			TLS:              cfg.TLS,
			Logger:           logger,
			Snapshot:         snapshot,
		})
		if err != nil {
			switch {
			case errors.Is(err, client.ErrNotFound):
				return nil, fmt.Errorf("%w: %w", blockdev.ErrNotFound, err)
			case errors.Is(err, client.ErrUnavailable):
				return nil, fmt.Errorf("%w: %w", blockdev.ErrUnavailable, err)
			}
			return nil, err
		}
		return clientVolume{v}, nil
	}
}

// clientVolume is a client volume (a blockdev.Device) whose errors speak
// the gateway's terms: fencing wraps ErrFenced, a full pool wraps ENOSPC
// (NBD answers NBD_ENOSPC).
type clientVolume struct{ *client.Volume }

func (c clientVolume) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := c.Volume.ReadAt(ctx, p, off)
	return n, translate(err)
}

func (c clientVolume) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := c.Volume.WriteAt(ctx, p, off)
	return n, translate(err)
}

func (c clientVolume) UnmapAt(ctx context.Context, off, length int64) error {
	return translate(c.Volume.UnmapAt(ctx, off, length))
}

func (c clientVolume) Flush(ctx context.Context) error { return translate(c.Volume.Flush(ctx)) }

// Map tells written chunks from holes (blockdev.Mapper).
func (c clientVolume) Map(ctx context.Context, off, length int64) ([]blockdev.Extent, error) {
	ext, err := c.Volume.Map(ctx, off, length)
	if err != nil {
		return nil, translate(err)
	}
	out := make([]blockdev.Extent, len(ext))
	for i, e := range ext {
		out[i] = blockdev.Extent{Length: e.Length, Hole: e.Hole}
	}
	return out, nil
}

func translate(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, client.ErrFenced):
		return fmt.Errorf("%w: %w", ErrFenced, err)
	case errors.Is(err, client.ErrNoSpace):
		return fmt.Errorf("%w: %w", syscall.ENOSPC, err)
	case errors.Is(err, client.ErrReadOnly):
		return fmt.Errorf("%w: %w", syscall.EROFS, err)
	}
	return err
}

// ReadOnly reports a snapshot (or another read-only handle).
func (c clientVolume) ReadOnly() bool { return c.Volume.ReadOnly() }

// SplitSnapshot splits an export name VOLUME@SNAPSHOT (a snapshot, read
// only) at its last "@"; a name without one is a volume.
func SplitSnapshot(name string) (volume, snapshot string) {
	if i := strings.LastIndexByte(name, '@'); i > 0 && i < len(name)-1 {
		return name[:i], name[i+1:]
	}
	return name, ""
}
