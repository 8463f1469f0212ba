// Command cairn-csi is Cairn's CSI driver (csi.cairn.io) for Kubernetes:
//
//	cairn-csi --endpoint unix:///csi/csi.sock --mds 10.0.0.5:6700 --mode controller
//
// It serves the CSI identity and controller services on the unix socket
// the sidecars (external-provisioner, external-resizer) talk to. See
// docs/csi.md.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"

	"cairn.io/cairn/csi"
	"cairn.io/cairn/internal/daemon"
)

func main() { daemon.Main("cairn-csi", run) }

func run(args []string) error {
	fs := flag.NewFlagSet("cairn-csi", flag.ContinueOnError)
	var (
		endpoint = fs.String("endpoint", daemon.EnvOr("CSI_ENDPOINT", "unix:///csi/csi.sock"), "unix socket the CSI services listen on (env CSI_ENDPOINT)")
		mdsAddrs = fs.String("mds", daemon.EnvOr("CAIRN_MDS", "127.0.0.1:6700"), "MDS addresses, comma-separated (env CAIRN_MDS)")
		nodeID   = fs.String("node-id", daemon.EnvOr("NODE_ID", ""), "this node's name (env NODE_ID; node mode)")
		mode     = fs.String("mode", csi.ModeController, "controller (node and all are not built yet)")
		logLevel = fs.String("log-level", "info", "debug, info, warn or error")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	logger, err := daemon.Logger(os.Stderr, *logLevel)
	if err != nil {
		return err
	}
	d, err := csi.New(csi.Config{
		Endpoint: *endpoint, MDSAddrs: daemon.SplitList(*mdsAddrs), NodeID: *nodeID, Mode: *mode,
		Version: daemon.Version(), Logger: logger,
	})
	if errors.Is(err, csi.ErrModeNotBuilt) {
		return fmt.Errorf("--mode %s: %w", *mode, err)
	}
	if err != nil {
		return err
	}
	if err := d.Start(); err != nil {
		return err
	}
	ctx, stop := daemon.SignalContext()
	defer stop()
	<-ctx.Done()
	logger.Info("shutting down")
	d.Stop()
	return nil
}
