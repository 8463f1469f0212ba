package ops

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
)

// Snapshots: create snapshot VOLUME NAME, list snapshot VOLUME, delete
// snapshot VOLUME NAME.

// snapshotView is a snapshot as cairn-ops prints it.
type snapshotView struct {
	Volume  string `json:"volume"`
	Name    string `json:"name"`
	Seq     uint64 `json:"seq"`
	Size    uint64 `json:"size"`
	Created string `json:"created"`
	Status  string `json:"status"`
	// Clones counts the clones that read it (some may be deleted or
	// released already).
	Clones int `json:"clones"`
}

func newSnapshotView(volume string, s *mdspb.Snapshot) snapshotView {
	return snapshotView{Volume: volume, Name: s.Name, Seq: s.Seq, Size: s.Size, Created: formatUnix(s.CreatedUnix), Status: s.Status.Label(), Clones: len(s.Clones)}
}

type snapshotTaken struct {
	Snapshot snapshotView `json:"snapshot"`
	// TookSeconds is how long the MDS took to take it.
	TookSeconds float64 `json:"took_seconds"`
}

func (r *snapshotTaken) writeTable(t *table) {
	s := r.Snapshot
	t.line("snapshot %q of volume %q taken in %s (sequence number %d, %s)", s.Name, s.Volume,
		(time.Duration(r.TookSeconds * float64(time.Second))).Round(time.Millisecond), s.Seq, formatBytes(s.Size))
}

func (a *app) createSnapshotCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "snapshot VOLUME NAME",
		Short: "Take a crash-consistent snapshot of a volume (copies nothing; writers go on)",
		Long: `create snapshot records the volume as it is now: every write acknowledged
before the command started is in the snapshot, none started after it returned
is. Nothing is copied: the first later write of each chunk keeps the chunk's
old data (copy on write). Read it as VOLUME@NAME through NBD or iSCSI.`,
		Args: exactArgs(2, "VOLUME NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			start := time.Now()
			resp, err := a.conn.Volumes().CreateSnapshot(cctx, &mdspb.CreateSnapshotRequest{Volume: args[0], Name: args[1]})
			if err != nil {
				return rpcErr(fmt.Sprintf("snapshot volume %q", args[0]), err)
			}
			return a.emit(&snapshotTaken{Snapshot: newSnapshotView(args[0], resp.Snapshot), TookSeconds: time.Since(start).Seconds()})
		}),
	}
}

type snapshotList struct {
	Snapshots []snapshotView `json:"snapshots"`
}

func (l *snapshotList) writeTable(t *table) {
	t.row("VOLUME", "NAME", "SEQ", "SIZE", "CREATED", "STATUS", "CLONES")
	for _, s := range l.Snapshots {
		t.row(s.Volume, s.Name, s.Seq, formatBytes(s.Size), s.Created, s.Status, s.Clones)
	}
}

func (a *app) listSnapshotCommand() *cobra.Command {
	return &cobra.Command{
		Use: "snapshot VOLUME", Aliases: []string{"snapshots", "snap"}, Short: "List a volume's snapshots",
		Args: exactArgs(1, "VOLUME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().ListSnapshots(cctx, &mdspb.ListSnapshotsRequest{Volume: args[0]})
			if err != nil {
				return rpcErr(fmt.Sprintf("list snapshots of volume %q", args[0]), err)
			}
			out := snapshotList{Snapshots: []snapshotView{}}
			for _, s := range resp.Snapshots {
				out.Snapshots = append(out.Snapshots, newSnapshotView(args[0], s))
			}
			return a.emit(&out)
		}),
	}
}

type snapshotDeleted struct {
	Volume  string `json:"volume"`
	Deleted string `json:"deleted"`
	// Freed is true once its space was given back (only with --wait).
	Freed bool `json:"freed"`
}

func (r *snapshotDeleted) writeTable(t *table) {
	state := "its space is given back in the background"
	if r.Freed {
		state = "its space is given back"
	}
	t.line("snapshot %q of volume %q deleted; %s", r.Deleted, r.Volume, state)
}

func (a *app) deleteSnapshotCommand() *cobra.Command {
	var yes bool
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "snapshot VOLUME NAME",
		Short: "Delete a snapshot (asks for its name as confirmation unless --yes)",
		Long: `delete snapshot makes the snapshot unreadable at once and gives back, in the
background, what only it kept of the volume's chunks.`,
		Args: exactArgs(2, "VOLUME NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			vol, name := args[0], args[1]
			if !yes {
				fmt.Fprintf(a.stderr, "Delete snapshot %q of volume %q? It cannot be recovered.\nType the snapshot name to confirm: ", name, vol)
				line, err := bufio.NewReader(a.stdin).ReadString('\n')
				if err != nil && !errors.Is(err, io.EOF) {
					return fmt.Errorf("read confirmation: %w", err)
				}
				if strings.TrimSpace(line) != name {
					fmt.Fprintln(a.stderr)
					return fmt.Errorf("delete snapshot %q: %w", name, ErrNotConfirmed)
				}
			}
			cctx, cancel := a.callCtx(ctx)
			_, err := a.conn.Volumes().DeleteSnapshot(cctx, &mdspb.DeleteSnapshotRequest{Volume: vol, Name: name})
			cancel()
			if err != nil {
				return rpcErr(fmt.Sprintf("delete snapshot %q of volume %q", name, vol), err)
			}
			res := &snapshotDeleted{Volume: vol, Deleted: name}
			if wait > 0 {
				if err := a.waitSnapshotGone(ctx, vol, name, wait); err != nil {
					return err
				}
				res.Freed = true
			}
			return a.emit(res)
		}),
	}
	cmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the snapshot's space to be given back")
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	return cmd
}

// waitSnapshotGone waits until the MDS has given back what a deleted
// snapshot kept and dropped its record. The MDS gives no count of the
// chunks trimmed: a terminal shows a spinner with when the deletion began
// (the trim starts a session lease after it).
func (a *app) waitSnapshotGone(ctx context.Context, vol, name string, wait time.Duration) error {
	poll := func(bool) (bool, progress, error) {
		cctx, cancel := a.callCtx(ctx)
		resp, err := a.conn.Volumes().ListSnapshots(cctx, &mdspb.ListSnapshotsRequest{Volume: vol})
		cancel()
		if err != nil {
			return false, progress{}, rpcErr(fmt.Sprintf("list snapshots of volume %q", vol), err)
		}
		s := deletingSnapshot(resp.Snapshots, name)
		if s == nil {
			return true, progress{}, nil
		}
		return false, progress{desc: fmt.Sprintf("giving back the space of snapshot %s@%s, deleted %s: the MDS trims its chunks a session lease after the delete (it gives no count of chunks trimmed)",
			vol, name, sinceUnix(s.DeletingUnix))}, nil
	}
	return a.waitUntil(ctx, wait, 200*time.Millisecond, poll, func() error {
		return fmt.Errorf("snapshot %q of volume %q is deleted, but its space is not all given back after %s; the MDS goes on", name, vol, wait)
	})
}

// sinceUnix says how long ago a Unix time was ("12s ago").
func sinceUnix(sec int64) string {
	if sec == 0 {
		return "at an unknown time"
	}
	return time.Since(time.Unix(sec, 0)).Truncate(time.Second).String() + " ago"
}

// deletingSnapshot returns the snapshot named name that is being deleted
// (its name may already be taken again), or nil.
func deletingSnapshot(list []*mdspb.Snapshot, name string) *mdspb.Snapshot {
	for _, s := range list {
		if s.Name == name && s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_DELETING {
			return s
		}
	}
	return nil
}
