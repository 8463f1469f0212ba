package attach

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/iscsi"
)

// Spec is what one attach process serves.
type Spec struct {
	// Volume is the Cairn volume's name.
	Volume string `json:"volume"`
	// Node is the node the volume is published to (the CSI node id).
	Node string `json:"node"`
	// MDSAddrs are the MDS addresses.
	MDSAddrs []string `json:"mds"`
	// ReadOnly opens the volume and the device read-only.
	ReadOnly bool `json:"read_only"`
	// Dir is the attachment's state directory (absolute): the FUSE mount,
	// the control socket and the record live in it.
	Dir string `json:"dir"`
	// TLS names the identity the attach process opens the volume with
	// (the node plugin's); empty: plaintext.
	TLS certs.Files `json:"tls,omitzero"`
	// Attach is how the volume becomes a block device: AttachFUSE (also
	// when empty), AttachNBD or AttachISCSI.
	Attach string `json:"attach,omitempty"`
	// ReattachTimeout (nbd, iscsi) is how long the kernel holds the
	// device's IO while no attach process serves it (the process died;
	// the plugin starts another that takes the device over) before failing
	// it.
	ReattachTimeout time.Duration `json:"reattach_timeout,omitempty"`
	// ISCSIAdm (iscsi) is the iscsiadm command (default DefaultISCSIAdm).
	ISCSIAdm string `json:"iscsiadm,omitempty"`
	// Takeover (nbd, iscsi), when set, makes the attach process take over
	// the device of an attach process that is gone instead of attaching
	// anew (see Record.Reattachable). Not recorded.
	Takeover *Takeover `json:"-"`
}

// Attach modes.
const (
	// AttachFUSE serves the volume as a FUSE file behind a loop device.
	AttachFUSE = "fuse"
	// AttachNBD serves the volume to the kernel's nbd driver on a socket
	// pair, configured through netlink (nbd.go).
	AttachNBD = "nbd"
	// AttachISCSI serves the volume as an iSCSI target on the loopback and
	// logs the kernel's initiator in with open-iscsi (iscsi.go).
	AttachISCSI = "iscsi"
)

// mode is the spec's attach mode, AttachFUSE when it names none (records
// written before there were others).
func (s Spec) mode() string {
	if s.Attach == "" {
		return AttachFUSE
	}
	return s.Attach
}

// Record is what an attach process writes to its directory once the
// device is attached, and to its ready line.
type Record struct {
	Spec
	// Pid is the attach process.
	Pid int `json:"pid"`
	// Device is the block device: the loop device /dev/loopN (fuse),
	// /dev/nbdN (nbd) or the session's disk /dev/sdX (iscsi).
	Device string `json:"device"`
	// Backing (fuse) identifies the FUSE file behind the device, so that a
	// device is detached only while it is still this attachment's.
	Backing fileID `json:"backing,omitzero"`
	// Backend (nbd) is the name the device was configured with
	// (NBD_ATTR_BACKEND_IDENTIFIER): a device is disconnected or taken over
	// only while the kernel shows this name for it.
	Backend string `json:"backend,omitempty"`
	// BootID (nbd, iscsi) is the kernel's boot id when the device was
	// configured: after a reboot the device of that number is another's.
	BootID string `json:"boot_id,omitempty"`
	// Portal (iscsi) is the loopback address the target listens on,
	// 127.0.0.1:PORT: an attach process that takes the session over
	// listens there again.
	Portal string `json:"portal,omitempty"`
	// Target (iscsi) is the attachment's target name (IQN).
	Target string `json:"target,omitempty"`
	// CHAP (iscsi) holds the target's secrets: the initiator's, and the
	// target's own for mutual CHAP. The record is readable by its owner
	// (root) only.
	CHAP *iscsi.CHAP `json:"chap,omitempty"`
	// StartedUnix is when the device was attached.
	StartedUnix int64 `json:"started_unix"`
}

// Files in an attachment's directory.
const (
	recordFile  = "record.json"
	controlSock = "control.sock"
	fuseDir     = "fuse"
	// LogFile receives the attach process's log.
	LogFile = "attach.log"
)

// maxSocketPath is the longest path a unix socket may have on Linux
// (sun_path is 108 bytes with its terminating NUL).
const maxSocketPath = 107

// backingFile is the file behind the loop device of an attachment.
func backingFile(dir string) string { return filepath.Join(dir, fuseDir, FileName) }

// Refresher is implemented by devices that learn a new size when asked
// (client.Volume): the control socket's resize asks before growing the
// loop device.
type Refresher interface {
	Refresh(ctx context.Context) error
}

// Serve attaches dev as spec says, writes the Record to the directory and
// as one JSON line to ready, and serves until ctx ends; then it detaches
// the device (fuse: detaches the loop device and unmounts the file system;
// nbd: disconnects the nbd device; iscsi: logs the kernel out) and closes
// dev. Serve owns dev from the
// start: it closes it on every return.
func Serve(ctx context.Context, spec Spec, dev blockdev.Device, ready io.Writer, log *slog.Logger) (err error) {
	defer func() {
		if cerr := dev.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close volume %s: %w", spec.Volume, cerr)
		}
	}()
	switch spec.mode() {
	case AttachFUSE:
		return serveFUSE(ctx, spec, dev, ready, log)
	case AttachNBD:
		return serveNBD(ctx, spec, dev, ready, log)
	case AttachISCSI:
		return serveISCSI(ctx, spec, dev, ready, log)
	}
	return fmt.Errorf("attach %s: unknown attach mode %q (want %s, %s or %s)", spec.Volume, spec.Attach, AttachFUSE, AttachNBD, AttachISCSI)
}

// serveFUSE is Serve for the fuse attach.
func serveFUSE(ctx context.Context, spec Spec, dev blockdev.Device, ready io.Writer, log *slog.Logger) (err error) {
	mnt := filepath.Join(spec.Dir, fuseDir)
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	sector, err := sectorOf(dev)
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	file := &volumeFile{dev: dev, sector: sector, readOnly: spec.ReadOnly, log: log}
	root := &volumeRoot{file: file}
	zero := time.Duration(0)
	srv, err := fs.Mount(mnt, root, &fs.Options{
		// Sizes are the volume's: never cache them for long.
		AttrTimeout: &zero, EntryTimeout: &zero,
		MountOptions: fuse.MountOptions{
			FsName: "cairn:" + spec.Volume, Name: "cairn", MaxWrite: 1 << 20,
			DirectMount: true, DisableXAttrs: true,
		},
	})
	if err != nil {
		return fmt.Errorf("attach %s: mount the volume's file system on %s: %w", spec.Volume, mnt, err)
	}
	defer func() {
		if uerr := srv.Unmount(); uerr != nil {
			log.Warn("unmount the volume's file system", "dir", mnt, "err", uerr)
			if err == nil {
				err = fmt.Errorf("unmount %s: %w", mnt, uerr)
			}
		}
	}()
	id, err := idOf(backingFile(spec.Dir))
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	bctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	loopDev, err := loopAttach(bctx, backingFile(spec.Dir), sector, spec.ReadOnly)
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if derr := loopDetach(dctx, loopDev, id, backingFile(spec.Dir)); derr != nil && err == nil {
			err = derr
		}
	}()
	rec := Record{Spec: spec, Pid: os.Getpid(), Device: loopDev, Backing: id, StartedUnix: time.Now().Unix()}
	// Growing: drop the kernel's idea of the file's size, read it again
	// (the loop device takes the size of the file's inode), then grow the
	// device.
	resize := func(ctx context.Context) error {
		root.file.NotifyContent(0, 0)
		if _, err := os.Stat(backingFile(spec.Dir)); err != nil {
			return err
		}
		return loopSetCapacity(ctx, loopDev)
	}
	ctl, err := serveControl(spec.Dir, rec, dev, sector, resize, log)
	if err != nil {
		return err
	}
	defer ctl.Close()
	if err := announce(rec, ready, log); err != nil {
		return err
	}
	<-ctx.Done()
	waitReleased(loopDev, log)
	log.Info("detaching", "volume", spec.Volume, "device", loopDev)
	return nil
}

// announce writes the record to its directory and as the ready line.
func announce(rec Record, ready io.Writer, log *slog.Logger) error {
	if err := writeRecord(rec); err != nil {
		return err
	}
	line, _ := json.Marshal(rec)
	if _, err := ready.Write(append(line, '\n')); err != nil {
		log.Warn("could not report the attach as ready", "err", err)
	}
	log.Info("volume attached", "volume", rec.Volume, "device", rec.Device, "attach", rec.mode(), "read_only", rec.ReadOnly)
	return nil
}

// waitReleased returns once nothing holds dev exclusively. A file system
// still mounted on the device would fail every IO once the volume closes:
// an attach process asked to stop serves on until it is released
// (Record.Stop does not ask while it is; SIGKILL still ends the process).
func waitReleased(dev string, log *slog.Logger) {
	for warned := false; deviceBusy(dev); time.Sleep(time.Second) {
		if !warned {
			log.Error("asked to stop while the device is in use; detaching once it is released", "device", dev)
			warned = true
		}
	}
}

// writeRecord writes rec to its directory atomically.
func writeRecord(rec Record) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return err
	}
	// Durable: after a crash or reboot it is how the device is found and
	// cleaned up.
	if err := fsutil.WriteFileAtomic(filepath.Join(rec.Dir, recordFile), b, 0o600); err != nil {
		return fmt.Errorf("write attach record: %w", err)
	}
	return nil
}

// ReadRecord reads the record an attach process left in dir; os.ErrNotExist
// when there is none.
func ReadRecord(dir string) (*Record, error) {
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err != nil {
		return nil, err
	}
	rec := &Record{}
	if err := json.Unmarshal(b, rec); err != nil {
		return nil, fmt.Errorf("attach record in %s: %w", dir, err)
	}
	return rec, nil
}

// Status is the control socket's answer about an attachment.
type Status struct {
	Device string `json:"device"`
	// Size is the device's size in bytes.
	Size int64 `json:"size"`
	// Error says why the volume does not answer ("" when it does).
	Error string `json:"error,omitempty"`
}

// serveControl serves the control socket: GET /status reads the volume's
// first sector (of sector bytes) to tell whether it answers; POST /resize
// learns the volume's size from the MDS and grows the device to it with
// resize.
func serveControl(dir string, rec Record, dev blockdev.Device, sector int64, resize func(context.Context) error, log *slog.Logger) (io.Closer, error) {
	path := filepath.Join(dir, controlSock)
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("control socket %s: the path is longer than the %d bytes a unix socket may have; use a shorter state directory", path, maxSocketPath)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		st := Status{Device: rec.Device, Size: dev.Size()}
		ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
		defer cancel()
		if _, err := dev.ReadAt(ctx, make([]byte, sector), 0); err != nil {
			st.Error = err.Error()
		}
		writeJSON(w, st)
	})
	mux.HandleFunc("POST /resize", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		if rf, ok := dev.(Refresher); ok {
			if err := rf.Refresh(ctx); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		if err := resize(ctx); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		log.Info("device resized", "device", rec.Device, "size", dev.Size())
		writeJSON(w, Status{Device: rec.Device, Size: dev.Size()})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	return srv, nil
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
