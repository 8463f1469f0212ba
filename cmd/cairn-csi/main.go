// Command cairn-csi is Cairn's CSI driver (csi.cairn.io) for Kubernetes:
//
//	cairn-csi --endpoint unix:///csi/csi.sock --mds 10.0.0.5:6700 --mode controller
//	cairn-csi --endpoint unix:///csi/csi.sock --mds 10.0.0.5:6700 --mode node --node-id worker-3
//
// It serves the CSI identity service and the controller service, the node
// service or both on the unix socket the sidecars talk to. The node runs
// the same binary as the attach process of each staged volume
// (cairn-csi attach ...). See docs/csi.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"cairn.io/cairn/csi"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/daemon"
	"cairn.io/cairn/internal/httpdebug"
)

func main() { daemon.Main("cairn-csi", run) }

func run(args []string) error {
	if len(args) > 0 && args[0] == attach.Subcommand {
		return runAttach(args[1:])
	}
	fs := flag.NewFlagSet("cairn-csi", flag.ContinueOnError)
	logFlags := daemon.AddLogFlags(fs)
	tlsFlags := certs.AddFlags(fs)
	var (
		endpoint = fs.String("endpoint", daemon.EnvOr("CSI_ENDPOINT", "unix:///csi/csi.sock"), "unix socket the CSI services listen on (env CSI_ENDPOINT)")
		mdsAddrs = fs.String("mds", daemon.EnvOr("CAIRN_MDS", "127.0.0.1:6700"), "MDS addresses, comma-separated (env CAIRN_MDS)")
		nodeID   = fs.String("node-id", daemon.EnvOr("NODE_ID", ""), "this node's name (env NODE_ID; node mode)")
		mode     = fs.String("mode", csi.ModeController, "controller, node or all")
		stateDir = fs.String("state-dir", "/var/lib/cairn-csi", "where the node keeps its attachments (node mode; must outlive the process)")
		topology = fs.String("topology", daemon.EnvOr("CAIRN_TOPOLOGY", ""), "the node's topology, key=value pairs comma-separated, e.g. zone=a (env CAIRN_TOPOLOGY)")
		defFs    = fs.String("default-fs-type", "ext4", "file system of mount volumes that name none: ext4 or xfs")
		attachBy = fs.String("attach", csi.AttachFUSE,
			"how the node attaches volumes: fuse (a FUSE file behind a loop device), nbd (the kernel's nbd driver, configured through netlink; needs the nbd module), iscsi (an iSCSI target on the loopback, logged in to with open-iscsi; needs the iscsi_tcp module, iscsiadm and iscsid) or auto (nbd where the nbd module is loaded, else iscsi where it can run, else fuse)")
		iscsiadm = fs.String("iscsiadm", attach.DefaultISCSIAdm, "iscsi: the iscsiadm command (a name in PATH or a path, for instance of a wrapper that runs the host's)")
		metrics  = fs.String("metrics-listen", daemon.EnvOr("CAIRN_METRICS_LISTEN", "-"),
			"address of /metrics (the Go runtime's), /healthz, /debug/loglevel and the profiler (env CAIRN_METRICS_LISTEN; \"-\", the default, disables it)")
		reattach = new(time.Duration)
	)
	fs.DurationVar(reattach, "reattach-timeout", attach.DefaultReattachTimeout,
		"nbd, iscsi: how long the kernel holds the IO of a volume whose attach process is gone (the plugin's container restarted) for the restarted plugin to take the device over, before failing it")
	fs.DurationVar(reattach, "nbd-reattach-timeout", attach.DefaultReattachTimeout, "the former name of --reattach-timeout")
	if err := daemon.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	topo := map[string]string{}
	for _, kv := range daemon.SplitList(*topology) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("--topology %q: want key=value pairs", *topology)
		}
		topo[k] = v
	}
	logger, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	identity, err := tlsFlags.Load(logger)
	if err != nil {
		return err
	}
	d, err := csi.New(csi.Config{
		Endpoint: *endpoint, MDSAddrs: daemon.SplitList(*mdsAddrs), NodeID: *nodeID, Mode: *mode,
		StateDir: *stateDir, Topology: topo, DefaultFsType: *defFs, Attach: *attachBy, ReattachTimeout: *reattach,
		ISCSIAdm: *iscsiadm,
		Version:  daemon.Version(), TLS: identity, Logger: logger,
	})
	if err != nil {
		return err
	}
	if err := d.Start(); err != nil {
		return err
	}
	side, err := httpdebug.Serve(*metrics, httpdebug.Handler(prometheus.DefaultGatherer, func(context.Context) (string, error) {
		return "serving " + *endpoint, nil
	}), logger)
	if err != nil {
		d.Stop()
		return err
	}
	if side != nil {
		logger.Info("metrics listener", "addr", side.Addr())
	}
	ctx, stop := daemon.SignalContext()
	defer stop()
	<-ctx.Done()
	logger.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	side.Close(sctx)
	cancel()
	d.Stop()
	return nil
}
