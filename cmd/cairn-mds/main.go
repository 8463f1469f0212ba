// Command cairn-mds runs Cairn's metadata server.
//
// By default it starts an embedded single-node etcd under --data-dir,
// listening on loopback only. With --etcd-endpoints it uses an external etcd
// cluster instead, and several cairn-mds processes can run against it: they
// elect a leader and the others redirect callers to it.
//
// Cluster constants (--chunk-size, --segment-size, --block-size,
// --meta-page-size) are fixed when the cluster is first started; later starts
// may leave them out, and a start with a different value is refused.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/daemon"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/mds"
)

func main() { daemon.Main("cairn-mds", run) }

func run(args []string) error {
	fs := flag.NewFlagSet("cairn-mds", flag.ContinueOnError)
	logFlags := daemon.AddLogFlags(fs)
	tlsFlags := certs.AddFlags(fs)
	var (
		dataDir      = fs.String("data-dir", "", "directory for the embedded etcd's data (required without --etcd-endpoints)")
		listen       = fs.String("listen", "127.0.0.1:6700", "gRPC listen address")
		advertise    = fs.String("advertise", "", "address other processes reach this MDS at (default: the bound listen address)")
		metrics      = fs.String("metrics-listen", "127.0.0.1:6701", "HTTP address of /metrics and /healthz (\"-\" disables)")
		endpoints    = fs.String("etcd-endpoints", "", "comma-separated client URLs of an external etcd cluster (default: embedded etcd)")
		etcdListen   = fs.String("embedded-etcd-listen", "127.0.0.1:6702", "client listen address of the embedded etcd (loopback only)")
		prefix       = fs.String("etcd-prefix", "/cairn/", "prefix of every etcd key")
		chunkSize    = fs.String("chunk-size", "", "chunk size on the cluster's first start (default 16MiB)")
		segmentSize  = fs.String("segment-size", "", "segment size on the cluster's first start (default 1GiB)")
		blockSize    = fs.String("block-size", "", "IO block size on the cluster's first start (default 512)")
		metaPage     = fs.String("meta-page-size", "", "chunk meta page size on the cluster's first start (default 4096)")
		hbInterval   = fs.Duration("heartbeat-interval", 3*time.Second, "heartbeat period asked of chunkservers")
		unstable     = fs.Duration("unstable-timeout", 0, "heartbeat age after which a chunkserver is UNSTABLE (default 3 heartbeat intervals)")
		offline      = fs.Duration("offline-timeout", 0, "heartbeat age after which a chunkserver is OFFLINE (default 10 heartbeat intervals)")
		lease        = fs.Duration("session-lease", 30*time.Second, "lifetime of a volume session without refresh")
		epochLease   = fs.Duration("epoch-lease", 0, "how long a chunkserver trusts its volume epochs after a heartbeat; a writable open that cannot reach a chunkserver waits this long (default 5 heartbeat intervals)")
		electionTTL  = fs.Duration("election-ttl", 5*time.Second, "lease of the leader's election key (failover time after a crash)")
		recoverAfter = fs.Duration("recover-after", 10*time.Minute, "how long a chunkserver may be unheard before its replicas are rebuilt on others")
		opTimeout    = fs.Duration("operator-timeout", 10*time.Minute, "drop an operator (a replica move, a leader transfer) that has not taken effect in this long")
		maxOps       = fs.Int("max-operators-per-chunkserver", 2, "operators (snapshot sends and receives, transfers) one chunkserver takes part in at once")
		noBalance    = fs.Bool("no-balance", false, "do not balance copysets and leaders (recovery and drains go on)")
		spaceWarn    = fs.Float64("space-warn", 0.8, "fraction of a chunkserver's space in use past which status warns")
		spaceFull    = fs.Float64("space-full", 0.95, "fraction of a chunkserver's space in use past which it takes no new replicas")
	)
	if err := daemon.Parse(fs, args); err != nil {
		return err
	}
	logger, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	identity, err := tlsFlags.Load(logger)
	if err != nil {
		return err
	}
	consts := &mdspb.ClusterConstants{}
	for _, f := range []struct {
		name string
		v    string
		set  func(uint64)
	}{
		{"chunk-size", *chunkSize, func(n uint64) { consts.ChunkSize = n }},
		{"segment-size", *segmentSize, func(n uint64) { consts.SegmentSize = n }},
		{"block-size", *blockSize, func(n uint64) { consts.BlockSize = uint32(n) }},
		{"meta-page-size", *metaPage, func(n uint64) { consts.MetaPageSize = uint32(n) }},
	} {
		if f.v == "" {
			continue
		}
		n, err := parseSize(f.v)
		if err != nil {
			return fmt.Errorf("--%s: %w", f.name, err)
		}
		if (f.name == "block-size" || f.name == "meta-page-size") && n > 1<<31 {
			return fmt.Errorf("--%s: %d is too large", f.name, n)
		}
		f.set(n)
	}
	cfg := mds.Config{
		DataDir: *dataDir, ListenAddr: *listen, AdvertiseAddr: *advertise, MetricsAddr: *metrics,
		EmbeddedEtcdAddr: *etcdListen, EtcdPrefix: *prefix, ElectionTTL: *electionTTL, Constants: consts,
		HeartbeatInterval: *hbInterval, UnstableTimeout: *unstable, OfflineTimeout: *offline,
		SessionLease: *lease, EpochLease: *epochLease, TLS: identity, Logger: logger,
		Schedule: mds.ScheduleConfig{
			RecoverAfter: *recoverAfter, OperatorTimeout: *opTimeout, MaxOperatorsPerChunkServer: *maxOps,
			NoBalance: *noBalance, SpaceWarn: *spaceWarn, SpaceFull: *spaceFull,
		},
	}
	if *endpoints != "" {
		for _, e := range strings.Split(*endpoints, ",") {
			if e = strings.TrimSpace(e); e != "" {
				cfg.EtcdEndpoints = append(cfg.EtcdEndpoints, e)
			}
		}
	}
	s, err := mds.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := daemon.SignalContext()
	defer stop()
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	err = s.Start(startCtx)
	cancel()
	if err != nil {
		return err
	}
	<-ctx.Done()
	logger.Info("shutting down")
	s.Stop()
	return nil
}

// parseSize reads a non-zero byte count such as 16MiB.
func parseSize(s string) (uint64, error) {
	n, err := units.ParseBytes(s)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, errors.New("size is 0")
	}
	return n, nil
}
