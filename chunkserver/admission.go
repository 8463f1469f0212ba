package chunkserver

import (
	"context"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/internal/wire"
)

// admit takes an in-flight slot, waiting for one while MaxInflight requests
// are served (back-pressure); it refuses with OVERLOAD only when the
// request's deadline passes first. A request served on its connection's
// reader (wire.Inline) does not wait: it gets errWouldBlock.
func (s *Server) admit(ctx context.Context) (release func(), e *reqError) {
	switch {
	case ctx.Err() == nil && s.slots.TryAcquire(1): // a caller that gave up gets no slot
	case wire.Inline(ctx):
		return nil, errWouldBlock
	default:
		if err := s.waitSlot(ctx); err != nil {
			return nil, refuse(chunkpb.Status_STATUS_OVERLOAD, "chunkserver %d: waited for one of %d request slots: %v", s.id.ChunkServerID, s.cfg.MaxInflight, err)
		}
	}
	s.inflight.Add(1)
	return func() {
		s.inflight.Add(-1)
		s.slots.Release(1)
	}, nil
}

// bounded returns ctx ending at most RequestTimeout from now: ctx itself
// when its deadline comes sooner (a client's deadline usually does), which
// spares a timer per request.
func (s *Server) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= s.cfg.RequestTimeout {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, s.cfg.RequestTimeout)
}

// waitSlot waits for a request slot for at most RequestTimeout.
func (s *Server) waitSlot(ctx context.Context) error {
	wctx, cancel := s.bounded(ctx)
	defer cancel()
	return s.slots.Acquire(wctx, 1)
}
