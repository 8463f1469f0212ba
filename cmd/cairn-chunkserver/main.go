// Command cairn-chunkserver runs one Cairn chunkserver over one data
// directory (one disk): it hosts copysets and serves chunk IO.
//
//	cairn-chunkserver --data-dir /data/cs0 --zone z1 --mds 127.0.0.1:6700
//
// Settings come from flags and, optionally, a YAML or JSON file given with
// --config whose keys are the flag names (data-dir, zone, mds, ...); a flag
// on the command line wins over the file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"time"

	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/daemon"
	"cairn.io/cairn/internal/units"
)

func main() { daemon.Main("cairn-chunkserver", run) }

func run(args []string) error {
	fs := flag.NewFlagSet("cairn-chunkserver", flag.ContinueOnError)
	logFlags := daemon.AddLogFlags(fs)
	tlsFlags := certs.AddFlags(fs)
	var (
		dataDir      = fs.String("data-dir", "", "data directory (one disk); required")
		listen       = fs.String("listen", "127.0.0.1:8200", "gRPC address for clients and peers")
		advertise    = fs.String("advertise", "", "address registered with the MDS (default: the listen address)")
		metrics      = fs.String("metrics-listen", "127.0.0.1:9200", "address of /metrics and /healthz (\"-\" disables)")
		mds          = fs.String("mds", daemon.EnvOr("CAIRN_MDS", "127.0.0.1:6700"), "MDS addresses, comma-separated (env CAIRN_MDS)")
		zone         = fs.String("zone", "", "failure domain (zone) of this chunkserver; required")
		hostname     = fs.String("hostname", "", "host name registered with the MDS (default: this machine's)")
		physicalPool = fs.String("physical-pool", "pool1", "physical pool to join")
		poolSize     units.Bytes
		poolMax      units.Bytes
		poolReserve  units.Bytes
		chunkSize    units.Bytes
		formatRate   units.Bytes
		snapRate     units.Bytes
		memLimit     units.Bytes
		inflight     units.Bytes
		logMem       units.Bytes
		trashExpiry  = fs.Duration("trash-expiry", 24*time.Hour, "how long a removed copyset stays in the trash")
	)
	fs.Var(&poolSize, "pool-size", "chunk file pool formatted at start (default 1GiB)")
	fs.Var(&poolMax, "pool-max", "largest size the pool grows to on demand (default: until --pool-reserve is left)")
	fs.Var(&poolReserve, "pool-reserve", "disk space the pool always leaves free (default 1GiB)")
	fs.Var(&chunkSize, "chunk-size", "chunk size when formatting a new pool (default: the cluster's, from the MDS)")
	fs.Var(&formatRate, "format-rate", "formatting throughput per second (default unlimited)")
	fs.Var(&snapRate, "snapshot-rate", "snapshot send throughput per second (default unlimited)")
	fs.Var(&memLimit, "memory-limit", "soft memory limit of the Go runtime: the garbage collector works harder near it (default 768MiB; env GOMEMLIMIT wins)")
	fs.Var(&inflight, "max-inflight-bytes", "bytes of proposals this chunkserver leads that may be in flight; more wait (default 64MiB)")
	fs.Var(&logMem, "max-log-memory", "bytes of Raft log entries all copysets may hold in memory (default 128MiB)")
	if err := daemon.Parse(fs, args); err != nil {
		return err
	}
	logger, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	if *dataDir == "" {
		return errors.New("--data-dir is required")
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		limit := int64(memLimit)
		if limit == 0 {
			limit = 768 << 20
		}
		debug.SetMemoryLimit(limit)
	}
	if *zone == "" {
		return errors.New("--zone is required: name the failure domain of this chunkserver")
	}
	identity, err := tlsFlags.Load(logger)
	if err != nil {
		return err
	}
	cfg := chunkserver.Config{
		DataDir: *dataDir, ListenAddr: *listen, AdvertiseAddr: *advertise, MetricsAddr: *metrics,
		MDSAddrs: daemon.SplitList(*mds), Zone: *zone, Hostname: *hostname, PhysicalPool: *physicalPool,
		ChunkSize:        int64(chunkSize),
		PoolInitialBytes: int64(poolSize), PoolMaxBytes: int64(poolMax), PoolReserveBytes: int64(poolReserve),
		FormatBytesPerSec: int64(formatRate), SnapshotBytesPerSec: int64(snapRate),
		TrashExpiry:      *trashExpiry,
		MaxInflightBytes: int64(inflight), MaxLogBytes: int64(logMem),
		TLS:    identity,
		Logger: logger,
	}
	s, err := chunkserver.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := daemon.SignalContext()
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	err = s.Start(startCtx)
	cancel()
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		logger.Info("shutting down")
		s.Stop()
		return nil
	case ferr := <-s.Failed():
		logger.Error("storage failed; exiting so that a restart recovers from the durable log", "err", ferr)
		s.Stop()
		return fmt.Errorf("storage failed: %w", ferr)
	}
}
