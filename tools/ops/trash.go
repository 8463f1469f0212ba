package ops

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
)

// trash volume NAME, list trash, restore volume ID, delete trash ID: a
// volume moved to the trash frees its name at once and keeps its data
// until it expires (then it is deleted) or is restored (rbd trash's).

type trashView struct {
	ID      uint64 `json:"id"`
	Name    string `json:"name"`
	Size    uint64 `json:"size"`
	Trashed string `json:"trashed"`
	Expires string `json:"expires"`
	// Snapshots counts the snapshots it keeps.
	Snapshots int `json:"snapshots"`
}

func newTrashView(v *mdspb.Volume) trashView {
	return trashView{ID: v.Id, Name: v.Name, Size: v.Size, Trashed: formatUnix(v.TrashedUnix), Expires: formatUnix(v.TrashExpiresUnix), Snapshots: len(v.Snapshots)}
}

type trashed struct {
	Volume trashView `json:"volume"`
}

func (r *trashed) writeTable(t *table) {
	t.line("volume %q (id %d) moved to the trash until %s; restore it with: cairn-ops restore volume %d", r.Volume.Name, r.Volume.ID, r.Volume.Expires, r.Volume.ID)
}

type trashList struct {
	Trash []trashView `json:"trash"`
}

func (l *trashList) writeTable(t *table) {
	t.row("ID", "NAME", "SIZE", "SNAPSHOTS", "TRASHED", "EXPIRES")
	for _, v := range l.Trash {
		t.row(v.ID, v.Name, formatBytes(v.Size), v.Snapshots, v.Trashed, v.Expires)
	}
}

type restored struct {
	Volume volumeView `json:"volume"`
}

func (r *restored) writeTable(t *table) {
	t.line("volume %q (id %d) restored from the trash: %s", r.Volume.Name, r.Volume.ID, formatBytes(r.Volume.Size))
}

type trashPurged struct {
	ID uint64 `json:"id"`
}

func (r *trashPurged) writeTable(t *table) {
	t.line("volume %d deleted from the trash; its chunks are freed in the background", r.ID)
}

func (a *app) trashCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "trash", Short: "Move a volume to the trash (restore it until it expires)"}
	var expires time.Duration
	var force bool
	vol := &cobra.Command{
		Use:   "volume NAME [--expires DURATION]",
		Short: "Move a volume to the trash: its name is free at once, its data kept until it expires",
		Long: `trash volume frees the volume's name at once and keeps its data (and its
snapshots) until --expires from now (default a week), when it is deleted;
until then cairn-ops restore volume ID brings it back. A volume open for
writing or published to a node is refused unless --force, and so, always,
is one whose snapshots clones read.`,
		Args: exactArgs(1, "NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			if expires < 0 || expires > 365*24*time.Hour {
				return usageError(fmt.Errorf("--expires %v: want up to a year", expires))
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().TrashVolume(cctx, &mdspb.TrashVolumeRequest{Name: args[0], ExpireSeconds: uint32(expires / time.Second), Force: force})
			if err != nil {
				return forceHint(rpcErr(fmt.Sprintf("move volume %q to the trash", args[0]), err), "trash volume "+args[0]+" --force")
			}
			return a.emit(&trashed{Volume: newTrashView(resp.Volume)})
		}),
	}
	vol.Flags().DurationVar(&expires, "expires", 7*24*time.Hour, "how long it stays in the trash before it is deleted")
	vol.Flags().BoolVar(&force, "force", false, "move it even while it is open for writing or published")
	cmd.AddCommand(vol)
	return cmd
}

func (a *app) listTrashCommand() *cobra.Command {
	return &cobra.Command{
		Use: "trash", Short: "List the volumes in the trash", Args: exactArgs(0, "none"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error {
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
			if err != nil {
				return rpcErr("list volumes", err)
			}
			out := trashList{Trash: []trashView{}}
			for _, v := range resp.Volumes {
				if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_TRASHED {
					out.Trash = append(out.Trash, newTrashView(v))
				}
			}
			return a.emit(&out)
		}),
	}
}

func (a *app) restoreCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "restore", Short: "Restore a volume from the trash"}
	var name string
	vol := &cobra.Command{
		Use:   "volume ID [--name NEW_NAME]",
		Short: "Take a volume out of the trash, under its old name or a new one",
		Args:  exactArgs(1, "ID"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			id, err := trashID(args[0])
			if err != nil {
				return err
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().RestoreVolume(cctx, &mdspb.RestoreVolumeRequest{Id: id, NewName: name})
			if err != nil {
				return rpcErr(fmt.Sprintf("restore volume %d", id), err)
			}
			return a.emit(&restored{Volume: newVolumeView(resp.Volume, nil)})
		}),
	}
	vol.Flags().StringVar(&name, "name", "", "restore it under this name (default: the name it had)")
	cmd.AddCommand(vol)
	return cmd
}

func (a *app) deleteTrashCommand() *cobra.Command {
	var yes bool
	cmd := &cobra.Command{
		Use:   "trash ID",
		Short: "Delete a volume from the trash now (asks for its name as confirmation unless --yes)",
		Args:  exactArgs(1, "ID"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			id, err := trashID(args[0])
			if err != nil {
				return err
			}
			if !yes {
				name := ""
				cctx, cancel := a.callCtx(ctx)
				resp, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
				cancel()
				if err != nil {
					return rpcErr("list volumes", err)
				}
				for _, v := range resp.Volumes {
					if v.Id == id && v.Status == mdspb.VolumeStatus_VOLUME_STATUS_TRASHED {
						name = v.Name
					}
				}
				if name == "" {
					return notFound(fmt.Errorf("no volume with id %d is in the trash", id))
				}
				fmt.Fprintf(a.stderr, "Delete volume %q (id %d) from the trash? Its data cannot be recovered.\nType the volume name to confirm: ", name, id)
				line, err := bufio.NewReader(a.stdin).ReadString('\n')
				if err != nil && !errors.Is(err, io.EOF) {
					return fmt.Errorf("read confirmation: %w", err)
				}
				if strings.TrimSpace(line) != name {
					return fmt.Errorf("not confirmed: volume %d left in the trash", id)
				}
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			if _, err := a.conn.Volumes().DeleteVolume(cctx, &mdspb.DeleteVolumeRequest{TrashedId: id}); err != nil {
				return rpcErr(fmt.Sprintf("delete volume %d from the trash", id), err)
			}
			return a.emit(&trashPurged{ID: id})
		}),
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation")
	return cmd
}

func trashID(s string) (uint64, error) {
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil || id == 0 {
		return 0, usageError(fmt.Errorf("volume id %q: want the number list trash shows", s))
	}
	return id, nil
}
