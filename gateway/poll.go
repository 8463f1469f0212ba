package gateway

import (
	"context"
	"time"

	"cairn.io/cairn/internal/units"
)

// refresher is implemented by volumes that can read their size from the MDS
// on demand (the client library's).
type refresher interface {
	Refresh(ctx context.Context) error
}

// pollLoop reads the MDS's volume list every PollInterval until Stop.
func (g *Gateway) pollLoop() {
	t := time.NewTicker(g.cfg.PollInterval)
	defer t.Stop()
	failing := false
	for {
		err := g.pollOnce(g.ctx)
		switch {
		case err != nil && g.ctx.Err() != nil:
			return
		case err != nil:
			g.metrics.pollFailed(err)
			if !failing {
				g.log.Warn("cannot list volumes at the MDS; exports stay as they are", "err", err)
			}
			failing = true
		default:
			if failing {
				g.log.Info("MDS reachable again")
			}
			failing = false
		}
		select {
		case <-g.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// pollOnce compares the MDS's volume list with the open volumes: a volume
// that disappeared loses its iSCSI sessions and NBD connections and closes
// when they are gone; a volume that grew is announced to its iSCSI initiators.
func (g *Gateway) pollOnce(ctx context.Context) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, pollTimeout)
	defer cancel()
	vols, err := g.listVolumes(ctx)
	if err != nil {
		return err
	}
	g.metrics.pollOK(len(vols))
	for _, e := range g.vols.openEntries() {
		if _, ok := vols[e.name]; !ok {
			if e.opened.After(start) {
				continue // opened after the list was read: judge it next time
			}
			g.log.Info("volume no longer listed by the MDS (deleted, renamed or not exported); ending its iSCSI sessions and NBD connections",
				"volume", e.name)
			g.vols.vanish(e)
			if g.iscsi != nil {
				g.iscsi.DropTarget(e.name)
			}
			if g.nbd != nil {
				g.nbd.DropExport(e.name)
			}
			continue
		}
		if listed := vols[e.name]; listed > e.vol.Size() {
			// The volume was extended; the client notices on its next
			// session refresh, or now when it can be asked.
			if r, ok := e.vol.(refresher); ok {
				if err := r.Refresh(ctx); err != nil {
					g.log.Warn("refresh volume size", "volume", e.name, "err", err)
				}
			}
		}
		size := e.vol.Size()
		old := e.size.Swap(size)
		if size == old {
			continue
		}
		g.log.Info("volume size changed", "volume", e.name,
			"from", units.FormatBytes(uint64(max(old, 0))), "to", units.FormatBytes(uint64(max(size, 0))))
		if g.iscsi != nil {
			g.iscsi.NotifyResize(e.name)
		}
	}
	return nil
}
