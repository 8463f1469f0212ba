package ops

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"cairn.io/cairn/client"
)

// export VOLUME@SNAPSHOT [--since SNAPSHOT] FILE, import FILE VOLUME and
// rollback VOLUME SNAPSHOT: whole images and the blocks that changed
// between two snapshots, the backup path (rbd export-diff's).

// exportBlock is the unit exports compare and write.
const exportBlock = 1 << 20

// splitSnapshotName splits VOLUME@SNAPSHOT.
func splitSnapshotName(name string) (volume, snapshot string, ok bool) {
	i := strings.LastIndexByte(name, '@')
	if i <= 0 || i == len(name)-1 {
		return name, "", false
	}
	return name[:i], name[i+1:], true
}

// openVolume opens a volume (or a snapshot of it) through the client
// library, as this operator.
func (a *app) openVolume(ctx context.Context, volume string, o client.Options) (*client.Volume, error) {
	o.TLS, o.Logger = a.identity, a.log
	if o.ClientName == "" {
		h, _ := os.Hostname()
		o.ClientName = fmt.Sprintf("cairn-ops@%s/pid-%d", h, os.Getpid())
	}
	v, err := client.OpenWithOptions(ctx, a.mdsAddrs, volume, o)
	switch {
	case errors.Is(err, client.ErrNotFound):
		return nil, notFound(err)
	case err != nil:
		return nil, err
	}
	return v, nil
}

// eachChangedBlock is client.EachChangedBlock in export blocks, with a
// progress bar.
func (a *app) eachChangedBlock(ctx context.Context, src, base *client.Volume, bar *progressbar.ProgressBar,
	f func(off int64, data []byte, zeros bool) error) error {
	var progress func(int64)
	if bar != nil {
		progress = func(done int64) { _ = bar.Set64(done) }
	}
	return client.EachChangedBlock(ctx, src, base, exportBlock, progress, f)
}

type exportResult struct {
	Volume      string  `json:"volume"`
	Snapshot    string  `json:"snapshot"`
	Since       string  `json:"since,omitempty"`
	File        string  `json:"file"`
	Size        uint64  `json:"size"`
	DataBytes   uint64  `json:"data_bytes"`
	ZeroBytes   uint64  `json:"zero_bytes"`
	Records     uint64  `json:"records"`
	TookSeconds float64 `json:"took_seconds"`
}

func (r *exportResult) writeTable(t *table) {
	what := "whole image"
	if r.Since != "" {
		what = "changes since " + r.Since
	}
	t.line("exported %s@%s (%s) to %s: %s of data, %s of zeros, %d records, in %s", r.Volume, r.Snapshot, what, r.File,
		formatBytes(r.DataBytes), formatBytes(r.ZeroBytes), r.Records, (time.Duration(r.TookSeconds * float64(time.Second))).Round(time.Millisecond))
}

func (a *app) exportCommand() *cobra.Command {
	var since string
	var force bool
	cmd := &cobra.Command{
		Use:   "export VOLUME@SNAPSHOT FILE",
		Short: "Write a snapshot's image to FILE (\"-\": standard output), or with --since only what changed since an earlier snapshot",
		Long: `export writes a snapshot's image: every block, or with --since S only the
blocks that differ from snapshot S of the same volume (an incremental export,
to apply with import onto a volume that holds S). The file is checksummed
record by record; import refuses one that is damaged or cut short.`,
		Args: exactArgs(2, "VOLUME@SNAPSHOT FILE"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			volume, snap, ok := splitSnapshotName(args[0])
			if !ok {
				return usageError(fmt.Errorf("export needs VOLUME@SNAPSHOT, not %q", args[0]))
			}
			start := time.Now()
			src, err := a.openVolume(ctx, volume, client.Options{Snapshot: snap})
			if err != nil {
				return err
			}
			defer src.Close()
			var base *client.Volume
			if since != "" {
				if base, err = a.openVolume(ctx, volume, client.Options{Snapshot: since}); err != nil {
					return err
				}
				defer base.Close()
			}
			out, closeOut, err := a.createOutput(args[1], force)
			if err != nil {
				return err
			}
			w := bufio.NewWriterSize(out, 4<<20)
			h := imageHeader{Block: exportBlock, Size: uint64(src.Size()), Incremental: base != nil, Volume: volume, Snapshot: snap, Since: since}
			res := &exportResult{Volume: volume, Snapshot: snap, Since: since, File: args[1], Size: h.Size}
			err = writeImageHeader(w, h)
			var zeroRun imageRecord // pending run of zero blocks
			flushZeros := func() error {
				if zeroRun.Length == 0 {
					return nil
				}
				res.Records++
				err := writeImageRecord(w, zeroRun)
				zeroRun = imageRecord{}
				return err
			}
			bar := a.byteBar(src.Size(), "exporting")
			if err == nil {
				err = a.eachChangedBlock(ctx, src, base, bar, func(off int64, data []byte, zeros bool) error {
					if zeros {
						res.ZeroBytes += uint64(len(data))
						if zeroRun.Length != 0 && zeroRun.Offset+uint64(zeroRun.Length) == uint64(off) && uint64(zeroRun.Length)+uint64(len(data)) <= maxZeroRecord {
							zeroRun.Length += uint32(len(data))
							return nil
						}
						if err := flushZeros(); err != nil {
							return err
						}
						zeroRun = imageRecord{Kind: recordZeros, Offset: uint64(off), Length: uint32(len(data))}
						return nil
					}
					if err := flushZeros(); err != nil {
						return err
					}
					res.Records++
					res.DataBytes += uint64(len(data))
					return writeImageRecord(w, imageRecord{Kind: recordData, Offset: uint64(off), Length: uint32(len(data)), Data: data})
				})
			}
			if err == nil {
				err = flushZeros()
			}
			if err == nil {
				err = writeImageRecord(w, imageRecord{Kind: recordEnd, Offset: res.Records})
			}
			if err == nil {
				err = w.Flush()
			}
			if bar != nil {
				_ = bar.Finish()
			}
			if cerr := closeOut(err == nil); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("export %s: %w", args[0], err)
			}
			// A snapshot deleted while it was read may have changed under
			// the export: refuse the image.
			for _, h := range []*client.Volume{src, base} {
				if h == nil {
					continue
				}
				if err := h.Refresh(ctx); err != nil {
					if args[1] != "-" {
						os.Remove(args[1])
					}
					return fmt.Errorf("export %s: %w", args[0], err)
				}
			}
			res.TookSeconds = time.Since(start).Seconds()
			if args[1] == "-" {
				// The image went to standard output: the summary goes to
				// standard error.
				return a.emitTo(a.stderr, res)
			}
			return a.emit(res)
		}),
	}
	cmd.Flags().StringVar(&since, "since", "", "export only what changed since this earlier snapshot of the volume")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite FILE if it exists")
	return cmd
}

// createOutput opens the export's destination: standard output for "-",
// else a new file (an existing one only with force). close syncs and
// closes it, removing a file left incomplete.
func (a *app) createOutput(name string, force bool) (io.Writer, func(ok bool) error, error) {
	if name == "-" {
		return a.stdout, func(bool) error { return nil }, nil
	}
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if force {
		flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(name, flags, 0o644)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, nil, usageError(fmt.Errorf("%s exists; remove it or pass --force", name))
		}
		return nil, nil, err
	}
	return f, func(ok bool) error {
		err := f.Sync()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if !ok || err != nil {
			os.Remove(name)
		}
		return err
	}, nil
}

// checkNotOpen refuses to change a volume that a client has open for
// writing: the change would fence it.
func (a *app) checkNotOpen(ctx context.Context, volume string) error {
	st, err := a.statVolume(ctx, volume)
	if err != nil {
		return err
	}
	for _, s := range st.Sessions {
		if s.Writable {
			return fmt.Errorf("volume %q is open for writing by %q (session %s); close it first", volume, s.Client, s.SessionId)
		}
	}
	return nil
}

type importResult struct {
	Volume      string  `json:"volume"`
	File        string  `json:"file"`
	From        string  `json:"from"`
	DataBytes   uint64  `json:"data_bytes"`
	ZeroBytes   uint64  `json:"zero_bytes"`
	Records     uint64  `json:"records"`
	TookSeconds float64 `json:"took_seconds"`
}

func (r *importResult) writeTable(t *table) {
	t.line("imported %s (%s) into volume %q: %s of data, %s zeroed, %d records, in %s", r.File, r.From, r.Volume,
		formatBytes(r.DataBytes), formatBytes(r.ZeroBytes), r.Records, (time.Duration(r.TookSeconds * float64(time.Second))).Round(time.Millisecond))
}

func (a *app) importCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "import FILE VOLUME",
		Short: "Write an export (\"-\": standard input) into a volume that no client has open for writing",
		Long: `import applies an export to VOLUME: a whole image, or an incremental one onto
the volume that holds its --since snapshot (import does not check that). The
volume must be at least the image's size and not open for writing elsewhere.
Each record is checked before it is written; a damaged or cut short file stops
the import with an error (what came before is written).`,
		Args: exactArgs(2, "FILE VOLUME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			start := time.Now()
			in := io.Reader(a.stdin)
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				in = f
			}
			r := bufio.NewReaderSize(in, 4<<20)
			h, err := readImageHeader(r)
			if err != nil {
				return fmt.Errorf("import %s: %w", args[0], err)
			}
			if err := a.checkNotOpen(ctx, args[1]); err != nil {
				return err
			}
			v, err := a.openVolume(ctx, args[1], client.Options{})
			if err != nil {
				return err
			}
			defer v.Close()
			if uint64(v.Size()) < h.Size {
				return fmt.Errorf("import %s: volume %q is %s, smaller than the %s image; extend it first", args[0], args[1], formatBytes(uint64(v.Size())), formatBytes(h.Size))
			}
			from := h.Volume + "@" + h.Snapshot
			if h.Incremental {
				from += " since " + h.Since
			}
			res := &importResult{Volume: args[1], File: args[0], From: from}
			bar := a.byteBar(int64(h.Size), "importing")
			var buf []byte
			for {
				var rec imageRecord
				rec, buf, err = readImageRecord(r, buf)
				if err != nil {
					return fmt.Errorf("import %s: %w", args[0], err)
				}
				if rec.Kind == recordEnd {
					if rec.Offset != res.Records {
						return fmt.Errorf("import %s: %w: the end record counts %d records, %d came", args[0], errImageCorrupt, rec.Offset, res.Records)
					}
					if _, err := r.ReadByte(); err != io.EOF {
						return fmt.Errorf("import %s: %w: data after the end record", args[0], errImageCorrupt)
					}
					break
				}
				if rec.Offset > h.Size || uint64(rec.Length) > h.Size-rec.Offset {
					return fmt.Errorf("import %s: %w: record at %d+%d past the image's %d bytes", args[0], errImageCorrupt, rec.Offset, rec.Length, h.Size)
				}
				res.Records++
				if rec.Kind == recordData {
					if _, err := v.WriteAt(ctx, rec.Data, int64(rec.Offset)); err != nil {
						return fmt.Errorf("import %s: write at %d: %w", args[0], rec.Offset, err)
					}
					res.DataBytes += uint64(rec.Length)
				} else {
					if err := v.UnmapAt(ctx, int64(rec.Offset), int64(rec.Length)); err != nil {
						return fmt.Errorf("import %s: zero at %d: %w", args[0], rec.Offset, err)
					}
					res.ZeroBytes += uint64(rec.Length)
				}
				if bar != nil {
					_ = bar.Set64(int64(rec.Offset) + int64(rec.Length))
				}
			}
			if err := v.Flush(ctx); err != nil {
				return fmt.Errorf("import %s: flush: %w", args[0], err)
			}
			if bar != nil {
				_ = bar.Finish()
			}
			res.TookSeconds = time.Since(start).Seconds()
			return a.emit(res)
		}),
	}
}

type rollbackResult struct {
	Volume       string  `json:"volume"`
	Snapshot     string  `json:"snapshot"`
	ChangedBytes uint64  `json:"changed_bytes"`
	TookSeconds  float64 `json:"took_seconds"`
}

func (r *rollbackResult) writeTable(t *table) {
	t.line("volume %q rolled back to snapshot %q: %s rewritten in %s", r.Volume, r.Snapshot, formatBytes(r.ChangedBytes),
		(time.Duration(r.TookSeconds * float64(time.Second))).Round(time.Millisecond))
}

func (a *app) rollbackCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "rollback VOLUME SNAPSHOT",
		Short: "Make a volume read as one of its snapshots again (rewrites the blocks that changed; the volume must not be open for writing)",
		Args:  exactArgs(2, "VOLUME SNAPSHOT"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			start := time.Now()
			if err := a.checkNotOpen(ctx, args[0]); err != nil {
				return err
			}
			snap, err := a.openVolume(ctx, args[0], client.Options{Snapshot: args[1]})
			if err != nil {
				return err
			}
			defer snap.Close()
			v, err := a.openVolume(ctx, args[0], client.Options{})
			if err != nil {
				return err
			}
			defer v.Close()
			res := &rollbackResult{Volume: args[0], Snapshot: args[1]}
			bar := a.byteBar(snap.Size(), "rolling back")
			err = a.eachChangedBlock(ctx, snap, v, bar, func(off int64, data []byte, zeros bool) error {
				res.ChangedBytes += uint64(len(data))
				if zeros {
					return v.UnmapAt(ctx, off, int64(len(data)))
				}
				_, err := v.WriteAt(ctx, data, off)
				return err
			})
			if tail := v.Size() - snap.Size(); err == nil && tail > 0 {
				// Grown since the snapshot: the part it did not have reads
				// as zeros again.
				err = v.UnmapAt(ctx, snap.Size(), tail)
			}
			if err == nil {
				err = v.Flush(ctx)
			}
			if bar != nil {
				_ = bar.Finish()
			}
			if err != nil {
				return fmt.Errorf("roll %s back to %s (partly done; run it again): %w", args[0], args[1], err)
			}
			res.TookSeconds = time.Since(start).Seconds()
			return a.emit(res)
		}),
	}
}
