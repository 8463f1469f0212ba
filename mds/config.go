package mds

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/geometry"
)

// maxEpochLease bounds Config.EpochLease: a writable open may wait that long.
const maxEpochLease = 10 * time.Minute

// ErrInvalidConfig is returned by New for a Config that cannot work.
var ErrInvalidConfig = errors.New("mds: invalid config")

// Config configures an MDS. Zero values take the defaults named on each field.
type Config struct {
	// DataDir holds the embedded etcd's data (DataDir/etcd). Required unless
	// EtcdEndpoints is set.
	DataDir string
	// ListenAddr is the gRPC listen address; default 127.0.0.1:6700. Port 0
	// picks a free port (see Server.Addr).
	ListenAddr string
	// AdvertiseAddr is the address other processes reach this MDS at (what
	// followers name in NotLeader answers); default the bound listen address.
	AdvertiseAddr string
	// MetricsAddr is the HTTP listen address of /metrics and /healthz;
	// default 127.0.0.1:6701; "-" disables it.
	MetricsAddr string

	// EtcdEndpoints selects an external etcd cluster. Empty starts an
	// embedded single-node etcd under DataDir.
	EtcdEndpoints []string
	// EmbeddedEtcdAddr is the client listen address of the embedded etcd;
	// default 127.0.0.1:0.
	EmbeddedEtcdAddr string
	// EtcdPrefix is prepended to every key; default "/cairn/".
	EtcdPrefix string
	// ElectionTTL is the lease of the leader's election key: when a leader
	// dies without resigning another takes over after at most this long.
	// Default 5s.
	ElectionTTL time.Duration

	// Constants are the cluster constants to store on the cluster's first
	// start. Zero fields take the stored value (or the default on first
	// start); a non-zero field that differs from the stored value is refused.
	Constants *mdspb.ClusterConstants

	// HeartbeatInterval is the heartbeat period chunkservers are told to use;
	// default 3s. A chunkserver is UNSTABLE after UnstableTimeout (default 3
	// intervals) without a heartbeat and OFFLINE after OfflineTimeout
	// (default 10 intervals).
	HeartbeatInterval time.Duration
	UnstableTimeout   time.Duration
	OfflineTimeout    time.Duration
	// EpochLease is how long a chunkserver may trust its volume epoch table
	// after a heartbeat: every heartbeat answer grants the lease until the
	// heartbeat's send time plus EpochLease, and a chunkserver without a
	// valid lease refuses epoch-checked requests (writes) with UNAVAILABLE.
	// A writable open that cannot push the new epoch to every chunkserver of
	// the volume's pool waits up to EpochLease plus a tenth (at least 100ms)
	// before it returns. Writes pause on a chunkserver that reaches no MDS
	// leader for this long, so keep it well above an MDS failover
	// (ElectionTTL plus a heartbeat interval). Default 5 heartbeat intervals
	// (15s with the default 3s interval); at least 2 intervals.
	EpochLease time.Duration
	// SessionLease is how long a volume session lives without a refresh;
	// default 30s.
	SessionLease time.Duration
	// BackgroundInterval paces the background work of the leader (freeing
	// the chunks of deleted volumes, expiring sessions, resuming pool
	// creation); default 2s.
	BackgroundInterval time.Duration
	// RPCTimeout bounds each call the MDS makes to a chunkserver; default 5s.
	RPCTimeout time.Duration

	// Schedule configures the schedulers that repair and balance copysets.
	Schedule ScheduleConfig

	// TLS is the MDS's identity: its listener then speaks mutual TLS only,
	// each call is checked against the caller's roles (Policy), and calls
	// to chunkservers use it too. Nil: plaintext, nothing checked.
	TLS *certs.Source
	// Logger receives structured logs; default slog.Default().
	Logger *slog.Logger

	// TestingKnobs change behaviour for tests only.
	TestingKnobs TestingKnobs
}

// ScheduleConfig configures the recover, drain and balance schedulers
// (package mds/schedule). Zero values take the defaults named.
type ScheduleConfig struct {
	// Interval paces scheduling rounds; default 2s.
	Interval time.Duration
	// RecoverAfter is how long a chunkserver may go unheard before its
	// replicas are rebuilt on others; default 10m. It is at least the
	// offline timeout, so that a restart or a short network cut moves
	// nothing.
	RecoverAfter time.Duration
	// OperatorTimeout drops an operator that has not taken effect in this
	// long (its copyset is planned again, avoiding the chunkserver that did
	// not take the replica); default 10m.
	OperatorTimeout time.Duration
	// MaxOperatorsPerChunkServer bounds the operators that involve one
	// chunkserver at a time (sending or receiving a snapshot, handing
	// over leadership); default 2.
	MaxOperatorsPerChunkServer int
	// BalanceTolerance is how far from its share a chunkserver's replica
	// and leader counts may be, as a fraction of the share; default 0.1.
	BalanceTolerance float64
	// NoBalance turns the balance schedulers off; repair and drain go on.
	NoBalance bool
	// SpaceWarn and SpaceFull are the fractions of a chunkserver's space in
	// use past which status warns and past which it takes no new
	// replicas; defaults 0.8 and 0.95.
	SpaceWarn, SpaceFull float64
}

// TestingKnobs are switches for tests; production code leaves them zero.
type TestingKnobs struct {
	// AbandonLeadershipOnStop makes Stop leave the election key to expire
	// with its lease instead of resigning, as a crashed MDS would.
	AbandonLeadershipOnStop bool
}

func (c *Config) setDefaults() error {
	if c.ListenAddr == "" {
		c.ListenAddr = "127.0.0.1:6700"
	}
	if c.MetricsAddr == "" {
		c.MetricsAddr = "127.0.0.1:6701"
	}
	if c.EtcdPrefix == "" {
		c.EtcdPrefix = "/cairn/"
	}
	if c.EmbeddedEtcdAddr == "" {
		c.EmbeddedEtcdAddr = "127.0.0.1:0"
	}
	if c.ElectionTTL == 0 {
		c.ElectionTTL = 5 * time.Second
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = 3 * time.Second
	}
	if c.UnstableTimeout == 0 {
		c.UnstableTimeout = 3 * c.HeartbeatInterval
	}
	if c.OfflineTimeout == 0 {
		c.OfflineTimeout = 10 * c.HeartbeatInterval
	}
	if c.EpochLease == 0 {
		c.EpochLease = 5 * c.HeartbeatInterval
	}
	if c.SessionLease == 0 {
		c.SessionLease = 30 * time.Second
	}
	if c.BackgroundInterval == 0 {
		c.BackgroundInterval = 2 * time.Second
	}
	if c.RPCTimeout == 0 {
		c.RPCTimeout = 5 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.Schedule.setDefaults()
	if c.Constants == nil {
		c.Constants = &mdspb.ClusterConstants{}
	}
	switch {
	case len(c.EtcdEndpoints) == 0 && c.DataDir == "":
		return fmt.Errorf("%w: a data directory is needed for the embedded etcd", ErrInvalidConfig)
	case c.ElectionTTL < time.Second:
		return fmt.Errorf("%w: election TTL %s is under 1s", ErrInvalidConfig, c.ElectionTTL)
	case c.UnstableTimeout > c.OfflineTimeout:
		return fmt.Errorf("%w: unstable timeout %s exceeds offline timeout %s", ErrInvalidConfig, c.UnstableTimeout, c.OfflineTimeout)
	case c.EpochLease < 2*c.HeartbeatInterval:
		return fmt.Errorf("%w: epoch lease %s is under 2 heartbeat intervals (%s): chunkservers would lose it between heartbeats", ErrInvalidConfig, c.EpochLease, c.HeartbeatInterval)
	case c.EpochLease > maxEpochLease:
		return fmt.Errorf("%w: epoch lease %s exceeds %s: a writable open may wait that long", ErrInvalidConfig, c.EpochLease, maxEpochLease)
	case c.SessionLease < time.Second:
		return fmt.Errorf("%w: session lease %s is under 1s", ErrInvalidConfig, c.SessionLease)
	case c.Schedule.RecoverAfter < c.OfflineTimeout:
		return fmt.Errorf("%w: recover-after %s is under the offline timeout %s: replicas would move off chunkservers that only restart",
			ErrInvalidConfig, c.Schedule.RecoverAfter, c.OfflineTimeout)
	case c.Schedule.SpaceWarn > c.Schedule.SpaceFull || c.Schedule.SpaceFull > 1:
		return fmt.Errorf("%w: space thresholds warn %.2f, full %.2f: want warn <= full <= 1", ErrInvalidConfig, c.Schedule.SpaceWarn, c.Schedule.SpaceFull)
	}
	return nil
}

func (c *ScheduleConfig) setDefaults() {
	if c.Interval == 0 {
		c.Interval = 2 * time.Second
	}
	if c.RecoverAfter == 0 {
		c.RecoverAfter = 10 * time.Minute
	}
	if c.OperatorTimeout == 0 {
		c.OperatorTimeout = 10 * time.Minute
	}
	if c.MaxOperatorsPerChunkServer == 0 {
		c.MaxOperatorsPerChunkServer = 2
	}
	if c.BalanceTolerance == 0 {
		c.BalanceTolerance = 0.1
	}
	if c.SpaceWarn == 0 {
		c.SpaceWarn = 0.8
	}
	if c.SpaceFull == 0 {
		c.SpaceFull = 0.95
	}
}

// resolveConstants merges the configured constants with the stored ones
// (stored may be nil on a cluster's first start) and checks them.
func resolveConstants(want, stored *mdspb.ClusterConstants) (*mdspb.ClusterConstants, error) {
	if stored != nil {
		for _, f := range []struct {
			name       string
			want, have uint64
		}{
			{"chunk size", want.GetChunkSize(), stored.GetChunkSize()},
			{"segment size", want.GetSegmentSize(), stored.GetSegmentSize()},
			{"block size", uint64(want.GetBlockSize()), uint64(stored.GetBlockSize())},
			{"meta page size", uint64(want.GetMetaPageSize()), uint64(stored.GetMetaPageSize())},
		} {
			if f.want != 0 && f.want != f.have {
				return nil, fmt.Errorf("%w: %s %d was configured but the cluster was created with %d; cluster constants never change",
					ErrConstantsMismatch, f.name, f.want, f.have)
			}
		}
		return stored, nil
	}
	c := &mdspb.ClusterConstants{
		ChunkSize:    want.GetChunkSize(),
		SegmentSize:  want.GetSegmentSize(),
		BlockSize:    want.GetBlockSize(),
		MetaPageSize: want.GetMetaPageSize(),
	}
	if c.ChunkSize == 0 {
		c.ChunkSize = geometry.DefaultChunkSize
	}
	if c.SegmentSize == 0 {
		c.SegmentSize = geometry.DefaultSegmentSize
	}
	if c.BlockSize == 0 {
		c.BlockSize = geometry.DefaultBlockSize
	}
	if c.MetaPageSize == 0 {
		c.MetaPageSize = geometry.DefaultMetaPageSize
	}
	if err := checkConstants(c); err != nil {
		return nil, err
	}
	return c, nil
}

func isPow2(v uint64) bool { return v != 0 && v&(v-1) == 0 }

func checkConstants(c *mdspb.ClusterConstants) error {
	bs := uint64(c.BlockSize)
	switch {
	case !isPow2(bs) || bs < 512:
		return fmt.Errorf("%w: block size %d is not a power of two of at least 512", ErrInvalidConfig, bs)
	case !isPow2(c.ChunkSize) || c.ChunkSize < 64<<10:
		return fmt.Errorf("%w: chunk size %d is not a power of two of at least 64 KiB", ErrInvalidConfig, c.ChunkSize)
	case c.ChunkSize%bs != 0:
		return fmt.Errorf("%w: chunk size %d is not a multiple of block size %d", ErrInvalidConfig, c.ChunkSize, bs)
	case c.SegmentSize == 0 || c.SegmentSize%c.ChunkSize != 0:
		return fmt.Errorf("%w: segment size %d is not a multiple of chunk size %d", ErrInvalidConfig, c.SegmentSize, c.ChunkSize)
	case c.SegmentSize/c.ChunkSize > 4096:
		return fmt.Errorf("%w: segment size %d holds more than 4096 chunks of %d", ErrInvalidConfig, c.SegmentSize, c.ChunkSize)
	case !isPow2(uint64(c.MetaPageSize)) || uint64(c.MetaPageSize) < bs:
		return fmt.Errorf("%w: meta page size %d is not a power of two of at least the block size %d", ErrInvalidConfig, c.MetaPageSize, bs)
	}
	return nil
}
