package chunkserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/geometry"
	"cairn.io/cairn/internal/httpdebug"
	"cairn.io/cairn/internal/wire"
	"cairn.io/cairn/mds/mdsclient"
)

// Config configures a chunkserver. Zero values take the defaults named.
type Config struct {
	// DataDir is the chunkserver's data directory (one disk). Required.
	DataDir string
	// ListenAddr is the gRPC address for clients and peers; default
	// 127.0.0.1:8200. Port 0 picks a free port (see Addr).
	ListenAddr string
	// AdvertiseAddr is the address registered with the MDS; default the
	// bound listen address.
	AdvertiseAddr string
	// MetricsAddr serves /metrics and /healthz; default 127.0.0.1:9200; "-"
	// disables it.
	MetricsAddr string
	// MDSAddrs are the MDS addresses (several for HA). Required.
	MDSAddrs []string
	// Zone (failure domain) and Hostname identify where this disk sits;
	// PhysicalPool names the pool it joins (default "pool1"). Hostname
	// defaults to the machine's host name.
	Zone, Hostname, PhysicalPool string

	// Chunk geometry. Zero asks the MDS for the cluster's constants when the
	// pool is first formatted; afterwards the pool's recorded geometry rules
	// and the MDS refuses a chunkserver whose geometry differs.
	ChunkSize, MetaPageSize, BlockSize int64
	// PoolInitialBytes is formatted in the background at start (default
	// 1 GiB); the pool grows on demand up to PoolMaxBytes (0: until the disk
	// keeps only PoolReserveBytes free, default 1 GiB).
	PoolInitialBytes, PoolMaxBytes, PoolReserveBytes int64
	// FormatBytesPerSec throttles formatting (0: unlimited).
	FormatBytesPerSec int64

	// MaxIOSize caps a request's payload (default 4 MiB, and never more
	// than the copysets accept: a quarter of a chunk file).
	MaxIOSize int64
	// MaxInflight caps chunk requests served at once (default 512); more
	// wait for a slot. Each client connection has at most MaxStreams
	// requests in the chunkserver (default 128): beyond it the client's
	// HTTP/2 layer waits, so request bodies never pile up here.
	MaxInflight int
	MaxStreams  uint32
	// RequestTimeout bounds a write's wait for its quorum (default 5s).
	RequestTimeout time.Duration
	// SpaceReserveChunks: writes that need a new chunk are refused with
	// NOSPACE when fewer clean pool files than this remain and the pool
	// cannot grow (default 8; they are kept for the WAL).
	SpaceReserveChunks int

	// Memory of the copysets (defaults from package copyset): proposal
	// bytes in flight and Raft log entries held in memory.
	MaxInflightBytes, MaxLogBytes int64

	// Raft tuning (defaults from package copyset).
	TickInterval        time.Duration
	ElectionTicks       int
	SnapshotBytesPerSec int64
	// TrashExpiry is how long a removed copyset stays in the trash (default
	// 24h).
	TrashExpiry time.Duration
	// HeartbeatInterval overrides the interval the MDS asks for.
	HeartbeatInterval time.Duration

	// TLS is the chunkserver's identity: its listener then speaks mutual
	// TLS only, each call and Raft message is checked against the caller's
	// roles (Policy), and its own connections (to the MDS, to peers) use
	// it too. Nil: plaintext, nothing checked.
	TLS    *certs.Source
	Logger *slog.Logger

	// TestingKnobs change behaviour for tests only.
	TestingKnobs TestingKnobs
}

func (c *Config) setDefaults() error {
	if c.DataDir == "" {
		return errors.New("chunkserver: no data directory")
	}
	if len(c.MDSAddrs) == 0 {
		return errors.New("chunkserver: no MDS address")
	}
	if c.Zone == "" {
		return errors.New("chunkserver: no zone: every chunkserver names its failure domain")
	}
	if c.ListenAddr == "" {
		c.ListenAddr = "127.0.0.1:8200"
	}
	if c.MetricsAddr == "" {
		c.MetricsAddr = "127.0.0.1:9200"
	}
	if c.Hostname == "" {
		h, err := os.Hostname()
		if err != nil {
			return fmt.Errorf("chunkserver: host name: %w", err)
		}
		c.Hostname = h
	}
	if c.PhysicalPool == "" {
		c.PhysicalPool = "pool1"
	}
	if c.PoolInitialBytes == 0 {
		c.PoolInitialBytes = 1 << 30
	}
	if c.PoolReserveBytes == 0 {
		c.PoolReserveBytes = 1 << 30
	}
	if c.MaxIOSize == 0 {
		c.MaxIOSize = 4 << 20
	}
	if c.MaxInflight == 0 {
		c.MaxInflight = 512
	}
	if c.MaxStreams == 0 {
		c.MaxStreams = 128
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 5 * time.Second
	}
	if c.SpaceReserveChunks == 0 {
		c.SpaceReserveChunks = 8
	}
	if c.TrashExpiry == 0 {
		c.TrashExpiry = 24 * time.Hour
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// Server is a running chunkserver.
type Server struct {
	cfg Config
	log *slog.Logger

	mds    *mdsclient.Conn
	pool   *chunkfilepool.Pool
	files  *datastore.FileCache
	engine *copyset.Engine
	epochs *epochTable
	res    *resolver
	id     *identity
	geom   chunkfilepool.Geometry

	grpc *grpc.Server
	wire *wire.Server // the data path: chunk IO on the same port as gRPC
	lis  net.Listener
	addr string
	http *httpdebug.Server
	reg  *prometheus.Registry
	m    *metrics

	inflight  atomic.Int64
	slots     *semaphore.Weighted // MaxInflight request slots
	hbEvery   time.Duration
	opsMu     sync.Mutex
	opsActive map[copyset.GroupID]bool
	// hbKick asks the heartbeat loop for a heartbeat now.
	hbKick chan struct{}

	stop    chan struct{}
	wg      sync.WaitGroup
	stopped atomic.Bool
	failed  chan error // receives the storage failure that stopped every copyset
}

// Failed delivers the error that made the chunkserver's storage fail (its
// write-ahead log could not write or sync). Every copyset has stopped by
// then; the daemon exits so that its supervisor restarts it, and recovery
// replays what the log made durable.
func (s *Server) Failed() <-chan error { return s.failed }

// New prepares a chunkserver; Start brings it up.
func New(cfg Config) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	return &Server{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "chunkserver"),
		stop:      make(chan struct{}),
		opsActive: map[copyset.GroupID]bool{},
		hbKick:    make(chan struct{}, 1),
		failed:    make(chan error, 1),
		slots:     semaphore.NewWeighted(int64(cfg.MaxInflight)),
	}, nil
}

// Start opens the data directory, registers with the MDS, recovers the
// copysets and serves. It returns once the chunkserver serves.
func (s *Server) Start(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			s.closeAll()
		}
	}()
	if err := os.MkdirAll(s.cfg.DataDir, 0o755); err != nil {
		return fmt.Errorf("chunkserver: create data dir: %w", err)
	}
	s.mds, err = mdsclient.Dial(s.cfg.MDSAddrs, mdsclient.Options{Logger: s.cfg.Logger, TLS: s.cfg.TLS})
	if err != nil {
		return fmt.Errorf("chunkserver: connect to MDS: %w", err)
	}
	if s.epochs, err = openEpochTable(s.cfg.DataDir); err != nil {
		return fmt.Errorf("chunkserver: %w", err)
	}
	if s.id, err = loadIdentity(s.cfg.DataDir); err != nil {
		return fmt.Errorf("chunkserver: %w", err)
	}
	if s.id == nil {
		// Without its identity this disk registers as a new chunkserver,
		// and the MDS retires the old one: replicas already here would be
		// discarded and rebuilt elsewhere. Refuse rather than do that to
		// a disk whose identity file alone was lost.
		if des, err := os.ReadDir(filepath.Join(s.cfg.DataDir, "engine", "copysets")); err == nil && len(des) > 0 {
			return fmt.Errorf("chunkserver: %s holds %d copyset replicas but no %s: restore that file (or move the data away to start this disk as a new chunkserver)",
				s.cfg.DataDir, len(des), identityFile)
		}
	}
	if s.id != nil && (s.id.Zone != s.cfg.Zone || s.id.PhysicalPool != s.cfg.PhysicalPool) {
		return fmt.Errorf("chunkserver: %s was registered in zone %q, physical pool %q; it cannot move to zone %q, pool %q",
			s.cfg.DataDir, s.id.Zone, s.id.PhysicalPool, s.cfg.Zone, s.cfg.PhysicalPool)
	}
	consts, err := s.clusterConstants(ctx)
	if err != nil {
		return err
	}
	if err := s.openPool(consts); err != nil {
		return err
	}
	s.lis, err = net.Listen("tcp", s.cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("chunkserver: listen on %s: %w", s.cfg.ListenAddr, err)
	}
	s.addr = s.lis.Addr().String()
	if s.cfg.AdvertiseAddr != "" {
		s.addr = s.cfg.AdvertiseAddr
	} else if host, _, err := net.SplitHostPort(s.addr); err == nil && net.ParseIP(host).IsUnspecified() {
		return fmt.Errorf("chunkserver: listening on %s needs --advertise: the address clients and peers reach (and verify) this chunkserver at", s.addr)
	}
	if err := s.register(ctx, consts); err != nil {
		return err
	}
	s.log = s.log.With("chunkserver", s.id.ChunkServerID)
	s.res = newResolver(s.mds, s.id.ChunkServerID, s.addr)
	s.reg = prometheus.NewRegistry()
	s.m = newMetrics(s.reg)
	s.engine, err = copyset.NewEngine(copyset.Config{
		NodeID:              s.id.ChunkServerID,
		Dir:                 filepath.Join(s.cfg.DataDir, "engine"),
		Segments:            s.pool,
		OpenStore:           s.openStore,
		ChunkSize:           s.geom.ChunkSize,
		CopyUnit:            geometry.CopyUnit(s.geom.ChunkSize, s.geom.MetaPageSize, s.geom.BlockSize),
		Resolver:            s.res,
		Dialer:              certs.Dialer(s.cfg.TLS, certs.RoleChunkServer),
		AuthorizeSender:     s.authorizeSender(),
		Members:             s.membersOracle(),
		DialOptions:         []grpc.DialOption{certs.DialOption(s.cfg.TLS, certs.RoleChunkServer)},
		TestingKnobs:        copyset.TestingKnobs{Faults: s.cfg.TestingKnobs.Faults},
		TickInterval:        s.cfg.TickInterval,
		ElectionTicks:       s.cfg.ElectionTicks,
		SnapshotBytesPerSec: s.cfg.SnapshotBytesPerSec,
		MaxInflightBytes:    s.cfg.MaxInflightBytes,
		MaxLogBytes:         s.cfg.MaxLogBytes,
		OnWALSync:           s.m.observeWALSync,
		OnProposalApplied:   s.m.observeProposal,
		OnStorageFailure: func(err error) {
			select {
			case s.failed <- err:
			default:
			}
		},
		Logger: s.cfg.Logger.With("chunkserver", s.id.ChunkServerID),
	})
	if err != nil {
		return fmt.Errorf("chunkserver: start copysets: %w", err)
	}
	s.m.register(s)
	if lim := s.engine.MaxWriteSize() &^ (s.geom.BlockSize - 1); s.cfg.MaxIOSize > lim {
		s.cfg.MaxIOSize = lim
	}

	gopts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(int(s.cfg.MaxIOSize) + (1 << 20)), grpc.MaxSendMsgSize(int(s.cfg.MaxIOSize) + (1 << 20)),
		grpc.MaxConcurrentStreams(s.cfg.MaxStreams),
	}
	var authorize func(context.Context, string) error
	var connContext func(context.Context, net.Conn) context.Context
	if s.cfg.TLS != nil {
		s.lis = certs.NewListener(s.lis, s.cfg.TLS, s.log)
		gopts = append(gopts, Policy.ServerOptions()...)
		authorize, connContext = Policy.WireAuthorize(), certs.WireConnContext
	}
	if k := s.cfg.TestingKnobs.UnaryInterceptor; k != nil {
		gopts = append(gopts, grpc.ChainUnaryInterceptor(k))
	}
	s.grpc = grpc.NewServer(gopts...)
	s.wire = wire.NewServer(wire.ServerOptions{
		MaxFrame:      int(s.cfg.MaxIOSize) + (1 << 20),
		MaxConcurrent: int(s.cfg.MaxStreams),
		Authorize:     authorize,
		ConnContext:   connContext,
		Logger:        s.cfg.Logger.With("component", "wire", "chunkserver", s.id.ChunkServerID),
	})
	s.registerServices(s.grpc, s.wire, s.engine)
	wireLis, grpcLis := wire.Split(s.lis)
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		if err := s.grpc.Serve(grpcLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			s.log.Error("gRPC server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		if err := s.wire.Serve(wireLis); err != nil {
			s.log.Error("wire server stopped", "err", err)
		}
	}()
	if err := s.startHTTP(); err != nil {
		return err
	}
	s.wg.Add(3)
	go s.heartbeatLoop()
	go s.trashLoop()
	go s.electionSummaryLoop()
	s.log.Info("chunkserver serving", "addr", s.addr, "zone", s.cfg.Zone, "host", s.cfg.Hostname,
		"copysets", len(s.engine.List()), "metrics", s.MetricsAddr())
	return nil
}

// clusterConstants asks the MDS for the cluster's constants.
func (s *Server) clusterConstants(ctx context.Context) (*mdspb.ClusterConstants, error) {
	resp, err := mdspb.NewClusterServiceClient(s.mds).GetClusterStatus(ctx, &mdspb.GetClusterStatusRequest{})
	if err != nil {
		return nil, fmt.Errorf("chunkserver: ask the MDS for the cluster constants: %w", err)
	}
	return resp.GetConstants(), nil
}

func (s *Server) openPool(consts *mdspb.ClusterConstants) error {
	chunk, meta, block := s.cfg.ChunkSize, s.cfg.MetaPageSize, s.cfg.BlockSize
	if chunk == 0 {
		chunk = int64(consts.GetChunkSize())
	}
	if meta == 0 {
		meta = int64(consts.GetMetaPageSize())
	}
	if block == 0 {
		block = int64(consts.GetBlockSize())
	}
	fileSize := chunk + meta
	initial := int(s.cfg.PoolInitialBytes / max(fileSize, 1))
	maxChunks := 0
	if s.cfg.PoolMaxBytes > 0 {
		maxChunks = int(s.cfg.PoolMaxBytes / max(fileSize, 1))
	}
	p, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir:       filepath.Join(s.cfg.DataDir, "chunkfilepool"),
		ChunkSize: chunk, MetaPageSize: meta, BlockSize: block,
		InitialChunks: initial, MaxChunks: maxChunks, ReserveBytes: s.cfg.PoolReserveBytes,
		FormatBytesPerSec: s.cfg.FormatBytesPerSec,
		Logger:            s.cfg.Logger,
	})
	if err != nil {
		return fmt.Errorf("chunkserver: open chunk file pool: %w", err)
	}
	s.pool, s.geom = p, p.Geometry()
	s.files = datastore.NewFileCache(datastore.DefaultFileCacheSize)
	return nil
}

func (s *Server) openStore(dir string) (copyset.ChunkStore, error) {
	return datastore.Open(dir, s.pool, datastore.Options{Files: s.files, Logger: s.cfg.Logger})
}

// register registers with the MDS (as the same chunkserver as before when an
// identity is on disk) and persists the identity.
func (s *Server) register(ctx context.Context, consts *mdspb.ClusterConstants) error {
	req := &mdspb.RegisterChunkServerRequest{
		Hostname:     s.cfg.Hostname,
		DataDir:      absPath(s.cfg.DataDir),
		Zone:         s.cfg.Zone,
		PhysicalPool: s.cfg.PhysicalPool,
		Address:      s.addr,
		Constants: &mdspb.ClusterConstants{
			ChunkSize: uint64(s.geom.ChunkSize), SegmentSize: consts.GetSegmentSize(),
			BlockSize: uint32(s.geom.BlockSize), MetaPageSize: uint32(s.geom.MetaPageSize),
		},
		Capacity: s.capacity(),
	}
	if s.id != nil {
		req.ChunkserverId, req.Token = s.id.ChunkServerID, s.id.Token
	}
	resp, err := mdspb.NewTopologyServiceClient(s.mds).RegisterChunkServer(ctx, req)
	if err != nil {
		return fmt.Errorf("chunkserver: register with the MDS: %w", err)
	}
	if s.id != nil && s.id.ChunkServerID != resp.GetChunkserverId() {
		return fmt.Errorf("chunkserver: the MDS answered id %d for a data dir registered as %d", resp.GetChunkserverId(), s.id.ChunkServerID)
	}
	id := &identity{ChunkServerID: resp.GetChunkserverId(), Token: resp.GetToken(), Hostname: s.cfg.Hostname, Zone: s.cfg.Zone, PhysicalPool: s.cfg.PhysicalPool}
	if s.id == nil || *s.id != *id {
		if err := saveIdentity(s.cfg.DataDir, id); err != nil {
			return fmt.Errorf("chunkserver: %w", err)
		}
	}
	s.id = id
	s.hbEvery = time.Duration(resp.GetHeartbeatIntervalMs()) * time.Millisecond
	if s.cfg.HeartbeatInterval > 0 {
		s.hbEvery = s.cfg.HeartbeatInterval
	}
	if s.hbEvery <= 0 {
		s.hbEvery = 3 * time.Second
	}
	return nil
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

func (s *Server) startHTTP() error {
	srv, err := httpdebug.Serve(s.cfg.MetricsAddr, httpdebug.Handler(s.reg, func(context.Context) (string, error) {
		if s.stopped.Load() {
			return "", errors.New("stopping")
		}
		return fmt.Sprintf("ok chunkserver %d", s.id.ChunkServerID), nil
	}), s.log)
	if err != nil {
		return fmt.Errorf("chunkserver: %w", err)
	}
	s.http = srv
	return nil
}

// Addr is the gRPC address the chunkserver registered.
func (s *Server) Addr() string { return s.addr }

// MetricsAddr is the bound metrics address ("" when disabled).
func (s *Server) MetricsAddr() string { return s.http.Addr() }

// ID is the chunkserver id the MDS assigned.
func (s *Server) ID() uint64 { return s.id.ChunkServerID }

// Engine is the copyset engine (for tests and tools in-process).
func (s *Server) Engine() *copyset.Engine { return s.engine }

// Stop shuts the chunkserver down cleanly: it stops serving, checkpoints
// every copyset and closes the WAL and the pool.
func (s *Server) Stop() {
	if !s.stopped.CompareAndSwap(false, true) {
		return
	}
	close(s.stop)
	s.closeAll()
}

func (s *Server) closeAll() {
	if s.grpc != nil {
		// Let requests in flight finish; peers' Raft streams never end on
		// their own, so the graceful phase is bounded.
		wireDone := make(chan struct{})
		go func() { _ = s.wire.Shutdown(2 * time.Second); close(wireDone) }()
		done := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			s.grpc.Stop()
			<-done
		}
		<-wireDone
	} else if s.lis != nil {
		s.lis.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	s.http.Close(ctx)
	cancel()
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	if s.engine != nil {
		if err := s.engine.Close(); err != nil {
			s.log.Error("closing copysets", "err", err)
		}
	}
	if s.pool != nil {
		s.pool.Close()
	}
	if s.mds != nil {
		s.mds.Close()
	}
	s.log.Info("chunkserver stopped")
}

// trashLoop purges copysets that sat in the trash past their expiry.
func (s *Server) trashLoop() {
	defer s.wg.Done()
	t := time.NewTicker(min(time.Hour, max(s.cfg.TrashExpiry/4, time.Minute)))
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			if n, err := s.engine.PurgeTrash(s.cfg.TrashExpiry); err != nil {
				s.log.Error("purging trash", "err", err)
			} else if n > 0 {
				s.log.Info("purged expired copysets from the trash", "count", n)
			}
		}
	}
}

// registerServices installs what the chunkserver serves: chunk IO (gRPC
// and the wire protocol), copysets, operators, and raft's transport.
func (s *Server) registerServices(g *grpc.Server, w *wire.Server, raft interface {
	Register(*grpc.Server, *wire.Server)
}) {
	chunks := &chunkService{s: s}
	chunkpb.RegisterChunkServiceServer(g, chunks)
	copysetpb.RegisterCopysetServiceServer(g, &copysetService{s: s})
	mdspb.RegisterOperatorServiceServer(g, operatorService{s: s})
	chunkpb.RegisterWireServer(w, chunks, s.cfg.TestingKnobs.UnaryInterceptor)
	raft.Register(g, w)
}
