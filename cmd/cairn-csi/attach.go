package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/client"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/daemon"
)

// runAttach is the attach process the node plugin starts for each staged
// volume (cairn-csi attach --dir D --volume V --node-id N --mds ADDRS
// [--attach nbd|iscsi]): it serves the volume as a loop device over a FUSE
// file, to the kernel's nbd driver, or as an iSCSI target on the loopback
// that it logs the kernel's initiator in to, until it is told to stop
// (SIGTERM).
func runAttach(args []string) error {
	fs := flag.NewFlagSet("cairn-csi attach", flag.ContinueOnError)
	logFlags := daemon.AddLogFlags(fs)
	tlsFlags := certs.AddFlags(fs)
	var (
		dir      = fs.String("dir", "", "the attachment's state directory (absolute)")
		volume   = fs.String("volume", "", "the volume to attach")
		nodeID   = fs.String("node-id", "", "this node's name: the volume must be published to it")
		mdsAddrs = fs.String("mds", "", "MDS addresses, comma-separated")
		readOnly = fs.Bool("read-only", false, "attach read-only")
		mode     = fs.String("attach", attach.AttachFUSE,
			"fuse (a FUSE file behind a loop device), nbd (the kernel's nbd driver) or iscsi (an iSCSI target on the loopback, with open-iscsi)")
		reattach = new(time.Duration)
		takeover = fs.String("nbd-takeover", "", "nbd: take over this /dev/nbdN, whose attach process is gone, instead of configuring a free device")
		backend  = fs.String("nbd-backend", "", "nbd: with --nbd-takeover, the name the device was configured with")
		target   = fs.String("iscsi-takeover", "",
			"iscsi: take over the kernel's session with this target, whose attach process is gone (its portal and secrets are in the record in --dir), instead of logging in anew")
		iscsiadm = fs.String("iscsiadm", attach.DefaultISCSIAdm, "iscsi: the iscsiadm command")
	)
	fs.DurationVar(reattach, "reattach-timeout", attach.DefaultReattachTimeout,
		"nbd, iscsi: how long the kernel holds the device's IO while no attach process serves it")
	fs.DurationVar(reattach, "nbd-reattach-timeout", attach.DefaultReattachTimeout, "the former name of --reattach-timeout")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	case *dir == "" || !filepath.IsAbs(*dir):
		return errors.New("--dir must be an absolute path")
	case *volume == "" || *nodeID == "" || *mdsAddrs == "":
		return errors.New("--volume, --node-id and --mds are required")
	case *mode != attach.AttachFUSE && *mode != attach.AttachNBD && *mode != attach.AttachISCSI:
		return fmt.Errorf("--attach %q: want %s, %s or %s", *mode, attach.AttachFUSE, attach.AttachNBD, attach.AttachISCSI)
	case (*takeover != "" || *backend != "") && (*mode != attach.AttachNBD || *takeover == "" || *backend == ""):
		return errors.New("--nbd-takeover and --nbd-backend go together, with --attach nbd")
	case *target != "" && *mode != attach.AttachISCSI:
		return errors.New("--iscsi-takeover goes with --attach iscsi")
	}
	logger, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	identity, err := tlsFlags.Load(logger)
	if err != nil {
		return err
	}
	logger = logger.With("volume", *volume)
	shieldFromReclaim(logger)
	ctx, stop := daemon.SignalContext()
	defer stop()
	spec := attach.Spec{Volume: *volume, Node: *nodeID, MDSAddrs: daemon.SplitList(*mdsAddrs), ReadOnly: *readOnly, Dir: *dir,
		Attach: *mode}
	if *mode == attach.AttachNBD || *mode == attach.AttachISCSI {
		spec.ReattachTimeout = *reattach
	}
	if *mode == attach.AttachISCSI {
		spec.ISCSIAdm = *iscsiadm
	}
	switch {
	case *takeover != "":
		spec.Takeover = &attach.Takeover{Device: *takeover, Backend: *backend}
	case *target != "":
		spec.Takeover = &attach.Takeover{Target: *target}
	}
	if identity != nil {
		spec.TLS = identity.Files()
	}
	octx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	vol, err := client.OpenWithOptions(octx, spec.MDSAddrs, spec.Volume, client.Options{
		ReadOnly: spec.ReadOnly, Node: spec.Node, ClientName: "csi-node/" + spec.Node, TLS: identity, Logger: logger,
	})
	cancel()
	if err != nil {
		return err
	}
	return attach.Serve(ctx, spec, vol, onceWriter{os.Stdout}, logger)
}

// shieldFromReclaim keeps the kernel from deadlocking on this process: it
// serves the writeback of a file system, so memory reclaim that waits for
// that writeback must not wait for this process's own allocations
// (PR_SET_IO_FLUSHER), and the OOM killer must not pick it (which would
// fail every IO of the volume). Both need CAP_SYS_RESOURCE; without it the
// process runs unshielded and says so.
func shieldFromReclaim(log *slog.Logger) {
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		log.Warn("cannot mark the attach process as an IO flusher (PR_SET_IO_FLUSHER)", "err", err)
	}
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0); err != nil {
		log.Warn("cannot exempt the attach process from the OOM killer", "err", err)
	}
}

// onceWriter writes the ready line and closes the output: the node plugin
// that reads it may be gone long before this process ends.
type onceWriter struct{ f *os.File }

func (w onceWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	return n, err
}

var _ io.Writer = onceWriter{}
