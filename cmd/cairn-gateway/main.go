// Command cairn-gateway serves the volumes of a Cairn cluster to unmodified
// initiators: an NBD export per volume and an iSCSI target per volume, from
// one process.
//
//	cairn-gateway --mds 127.0.0.1:6700
//	nbdinfo nbd://127.0.0.1:10809/vol0
//	iscsi-ls -s iscsi://127.0.0.1:3260
//
// Export names are volume names; the iSCSI target of volume v is
// iqn.2026-11.io.cairn:v with LUN 0. SIGTERM or SIGINT stops accepting
// connections, lets the requests in flight finish, flushes and closes the
// volumes, then exits.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"cairn.io/cairn/client"
	"cairn.io/cairn/gateway"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/daemon"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/iscsi"
	"cairn.io/cairn/nbd"
)

func main() { daemon.Main("cairn-gateway", run) }

func run(args []string) error {
	cfg, err := parseConfig(args)
	if err != nil {
		return err
	}
	logger := cfg.Logger
	g, err := gateway.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := daemon.SignalContext()
	defer stop()
	if err := g.Start(ctx); err != nil {
		g.Stop()
		return err
	}
	<-ctx.Done()
	logger.Info("shutting down")
	return g.Stop()
}

// parseConfig turns the command line into the gateway's configuration,
// reading the CHAP secrets file when one is named.
func parseConfig(args []string) (gateway.Config, error) {
	fs := flag.NewFlagSet("cairn-gateway", flag.ContinueOnError)
	logFlags := daemon.AddLogFlags(fs)
	tlsFlags := certs.AddFlags(fs)
	var (
		mds         = fs.String("mds", daemon.EnvOr("CAIRN_MDS", "127.0.0.1:6700"), "MDS addresses, comma-separated (env CAIRN_MDS)")
		nbdListen   = fs.String("nbd-listen", gateway.DefaultNBDAddr, "NBD listen address (\"-\" disables NBD)")
		iscsiListen = fs.String("iscsi-listen", gateway.DefaultISCSIAddr, "iSCSI portal address (\"-\" disables iSCSI)")
		metrics     = fs.String("metrics-listen", gateway.DefaultMetricsAddr, "address of /metrics and /healthz (\"-\" disables)")
		volumes     = fs.String("volumes", "", "comma-separated volume names to export (default: every volume)")
		poll        = fs.Duration("poll-interval", gateway.DefaultPollInterval, "how often the MDS's volume list is read (deleted and grown volumes)")
		linger      = fs.Duration("linger", gateway.DefaultLinger, "how long a volume stays open after its last user left")
		clientName  = fs.String("client-name", "", "name of the gateway's volume sessions at the MDS (default cairn-gateway@<host>)")
		nopInterval = fs.Duration("iscsi-nop-interval", 10*time.Second, "idle time after which the target pings an iSCSI initiator")
		nbdTLS      = fs.String("nbd-tls", "", "TLS for NBD clients (NBD_OPT_STARTTLS, nbds://): off, allow or require (default allow with --tls-cert, else off); clients present a certificate with the client or operator role")
		chapFile    = fs.String("iscsi-chap", "", "JSON file of iSCSI CHAP secrets: default, discovery and per-volume targets (docs/gateway.md)")
		nbdBytes    = units.Bytes(nbd.DefaultMaxInFlightBytes)
		iscsiBytes  = units.Bytes(iscsi.DefaultMaxSessionBuffer)
		volumeBytes = units.Bytes(client.DefaultMaxInflightBytes)
	)
	fs.Var(&nbdBytes, "nbd-max-inflight-bytes", "READ/WRITE payload one NBD connection may hold in memory; beyond it the gateway stops reading that connection")
	fs.Var(&iscsiBytes, "iscsi-session-buffer", "data buffers one iSCSI session may hold (unsolicited, solicited and read data); it also sizes the CmdSN window and the maximum transfer length")
	fs.Var(&volumeBytes, "volume-max-inflight-bytes", "data of the chunk requests in flight per open volume; IO beyond it waits")
	if err := daemon.Parse(fs, args); err != nil {
		return gateway.Config{}, err
	}
	if fs.NArg() > 0 {
		return gateway.Config{}, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	logger, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return gateway.Config{}, err
	}
	identity, err := tlsFlags.Load(logger)
	if err != nil {
		return gateway.Config{}, err
	}
	if *clientName == "" {
		host, _ := os.Hostname()
		*clientName = "cairn-gateway@" + host
	}
	cfg := gateway.Config{
		MDSAddrs:     daemon.SplitList(*mds),
		NBDAddr:      *nbdListen,
		ISCSIAddr:    *iscsiListen,
		MetricsAddr:  *metrics,
		Volumes:      daemon.SplitList(*volumes),
		PollInterval: *poll,
		Linger:       *linger,
		ClientName:   *clientName,
		TLS:          identity,
		NBDTLS:       *nbdTLS,
		Logger:       logger,

		VolumeMaxInflightBytes: int64(volumeBytes),
	}
	cfg.ISCSI.NopInterval = *nopInterval
	cfg.ISCSI.MaxSessionBuffer = int64(iscsiBytes)
	cfg.NBD.MaxInFlightBytes = int64(nbdBytes)
	if *chapFile != "" {
		secrets, err := iscsi.ReadCHAPSecrets(*chapFile)
		if err != nil {
			return gateway.Config{}, fmt.Errorf("--iscsi-chap: %w", err)
		}
		if st, err := os.Stat(*chapFile); err == nil && st.Mode().Perm()&0o077 != 0 {
			logger.Warn("the CHAP secrets file is readable by other users; chmod 600 it", "file", *chapFile,
				"mode", st.Mode().Perm().String())
		}
		secrets.Apply(&cfg.ISCSI)
		logger.Info("iSCSI CHAP configured", "file", *chapFile, "targets", len(secrets.Targets),
			"default", secrets.Default != nil, "discovery", secrets.Discovery != nil)
	}
	return cfg, nil
}
