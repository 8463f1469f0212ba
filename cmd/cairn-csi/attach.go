package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"cairn.io/cairn/client"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/daemon"
)

// runAttach is the attach process the node plugin starts for each staged
// volume (cairn-csi attach --dir D --volume V --node-id N --mds ADDRS):
// it serves the volume as a loop device until it is told to stop (SIGTERM).
func runAttach(args []string) error {
	fs := flag.NewFlagSet("cairn-csi attach", flag.ContinueOnError)
	var (
		dir      = fs.String("dir", "", "the attachment's state directory (absolute)")
		volume   = fs.String("volume", "", "the volume to attach")
		nodeID   = fs.String("node-id", "", "this node's name: the volume must be published to it")
		mdsAddrs = fs.String("mds", "", "MDS addresses, comma-separated")
		readOnly = fs.Bool("read-only", false, "attach read-only")
		logLevel = fs.String("log-level", "info", "debug, info, warn or error")
	)
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
	}
	logger, err := daemon.Logger(os.Stderr, *logLevel)
	if err != nil {
		return err
	}
	logger = logger.With("volume", *volume)
	ctx, stop := daemon.SignalContext()
	defer stop()
	spec := attach.Spec{Volume: *volume, Node: *nodeID, MDSAddrs: daemon.SplitList(*mdsAddrs), ReadOnly: *readOnly, Dir: *dir}
	octx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	vol, err := client.OpenWithOptions(octx, spec.MDSAddrs, spec.Volume, client.Options{
		ReadOnly: spec.ReadOnly, Node: spec.Node, ClientName: "csi-node/" + spec.Node, Logger: logger,
	})
	cancel()
	if err != nil {
		return err
	}
	return attach.Serve(ctx, spec, vol, onceWriter{os.Stdout}, logger)
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
