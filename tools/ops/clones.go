package ops

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
)

// cloneOf reads --from VOLUME@SNAPSHOT.
func cloneOf(from string) (volume, snapshot string, err error) {
	volume, snapshot, ok := splitSnapshotName(from)
	if !ok {
		return "", "", usageError(fmt.Errorf("--from %q: want VOLUME@SNAPSHOT", from))
	}
	return volume, snapshot, nil
}

type flattenResult struct {
	Volume      string  `json:"volume"`
	Source      string  `json:"source"`
	CopiedBytes int64   `json:"copied_bytes"`
	TookSeconds float64 `json:"took_seconds"`
	// Released is true once the MDS released the source (only with --wait):
	// the snapshot may then be deleted.
	Released bool `json:"released"`
}

func (r *flattenResult) writeTable(t *table) {
	took := time.Duration(r.TookSeconds * float64(time.Second)).Round(time.Millisecond)
	rate := ""
	if r.TookSeconds > 0 {
		rate = fmt.Sprintf(" (%s/s)", formatBytes(uint64(float64(r.CopiedBytes)/r.TookSeconds)))
	}
	t.line("volume %q flattened: %s copied from %s in %s%s", r.Volume, formatBytes(uint64(r.CopiedBytes)), r.Source, took, rate)
	if r.Released {
		t.line("the source is released: %s may be deleted", r.Source)
	} else {
		t.line("the source is released a session lease from now (then %s may be deleted)", r.Source)
	}
}

func (a *app) flattenCommand() *cobra.Command {
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "flatten VOLUME",
		Short: "Copy into a clone what it still reads from its source snapshot, so that the snapshot can be deleted",
		Long: `flatten copies every page of the clone's source snapshot that the clone has
not written into the clone, with a progress bar; writers of the clone go on
meanwhile (a page copied never overwrites one they wrote). The MDS then
releases the source a session lease later, once every handle of the clone
has heard of it; --wait waits for that.`,
		Args: exactArgs(1, "VOLUME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			start := time.Now()
			v, err := a.openVolume(ctx, args[0], client.Options{ReadOnly: true})
			if err != nil {
				return err
			}
			defer v.Close()
			source, _ := v.Source()
			if source == "" {
				return fmt.Errorf("volume %q is not a clone (or its source was released already)", args[0])
			}
			var progress func(done, total int64)
			bar := a.byteBar(v.Size(), "flattening")
			if bar != nil {
				progress = func(done, total int64) {
					bar.ChangeMax64(total)
					_ = bar.Set64(done)
				}
			}
			copied, err := v.Flatten(ctx, progress)
			if bar != nil {
				_ = bar.Finish()
			}
			if err != nil {
				return fmt.Errorf("%w (partly done; run it again)", err)
			}
			res := &flattenResult{Volume: args[0], Source: source, CopiedBytes: copied, TookSeconds: time.Since(start).Seconds()}
			if wait > 0 {
				if err := a.waitReleased(ctx, args[0], wait); err != nil {
					return err
				}
				res.Released = true
			}
			return a.emit(res)
		}),
	}
	cmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the MDS to release the source (0: do not wait)")
	return cmd
}

// waitReleased waits until a flattened clone no longer names its source.
// The MDS gives no figures for it: a terminal shows a spinner with when the
// clone was flattened (the release comes a session lease after it).
func (a *app) waitReleased(ctx context.Context, name string, wait time.Duration) error {
	poll := func(bool) (bool, progress, error) {
		cctx, cancel := a.callCtx(ctx)
		resp, err := a.conn.Volumes().StatVolume(cctx, &mdspb.StatVolumeRequest{Name: name})
		cancel()
		if err != nil {
			return false, progress{}, rpcErr(fmt.Sprintf("stat volume %q", name), err)
		}
		src := resp.GetVolume().GetCloneSource()
		if src == nil {
			return true, progress{}, nil
		}
		return false, progress{desc: fmt.Sprintf("waiting for the MDS to release %s@%s from clone %s, flattened %s: it does so a session lease after the flatten",
			src.Volume, src.Snapshot, name, sinceUnix(src.FlattenedUnix))}, nil
	}
	return a.waitUntil(ctx, wait, 200*time.Millisecond, poll, func() error {
		return fmt.Errorf("volume %q is flattened, but its source is not released after %s; the MDS releases it a session lease after the flatten", name, wait)
	})
}
