package mds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/grpcconn"
	"cairn.io/cairn/internal/httpdebug"
	"cairn.io/cairn/mds/embedetcd"
)

// ErrConstantsMismatch is returned by Start when the configured cluster
// constants differ from the ones stored when the cluster was created.
var ErrConstantsMismatch = errors.New("mds: cluster constants mismatch")

// Server is one MDS process: a gRPC server, an etcd client (and, by default,
// the embedded etcd it talks to), and a campaign in the leader election. Only
// while it leads does it serve; otherwise every call is answered with
// UNAVAILABLE and the leader's address.
type Server struct {
	cfg Config
	log *slog.Logger

	etcd     *embedetcd.Etcd
	cli      *clientv3.Client
	consts   *mdspb.ClusterConstants
	keys     keys
	grpc     *grpc.Server
	lis      net.Listener
	http     *httpdebug.Server
	registry *prometheus.Registry
	metrics  *metrics
	conns    *grpcconn.Cache
	advAddr  string

	cancel context.CancelFunc
	done   chan struct{}

	mu struct {
		sync.Mutex
		leader  *leaderState // nil while not leading
		stopped bool
	}
}

// New checks the config and returns a Server that is not running yet.
func New(cfg Config) (*Server, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "mds"), keys: keys{p: cfg.EtcdPrefix}}
	s.registry = prometheus.NewRegistry()
	s.metrics = newMetrics(s)
	s.registry.MustRegister(s.metrics, collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s.conns = grpcconn.NewCache("chunkserver", certs.DialOption(cfg.TLS, certs.RoleChunkServer))
	return s, nil
}

// Start connects to (or starts) etcd, checks the cluster constants, starts
// serving gRPC and metrics, and joins the leader election. It returns once
// the server accepts connections; Leading reports when it leads.
func (s *Server) Start(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			s.closeResources()
		}
	}()
	endpoints := s.cfg.EtcdEndpoints
	if len(endpoints) == 0 {
		dir := filepath.Join(s.cfg.DataDir, "etcd")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("mds: data dir: %w", err)
		}
		s.etcd, err = embedetcd.Start(ctx, embedetcd.Config{Dir: dir, ClientAddr: s.cfg.EmbeddedEtcdAddr})
		if err != nil {
			return err
		}
		endpoints = s.etcd.Endpoints()
	}
	s.cli, err = clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		Context:     context.WithoutCancel(ctx),
	})
	if err != nil {
		return fmt.Errorf("mds: etcd client for %v: %w", endpoints, err)
	}
	if err := s.initConstants(ctx); err != nil {
		return err
	}
	s.lis, err = net.Listen("tcp", s.cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("mds: listen %s: %w", s.cfg.ListenAddr, err)
	}
	s.advAddr = s.cfg.AdvertiseAddr
	if s.advAddr == "" {
		s.advAddr = s.lis.Addr().String()
		if host, _, err := net.SplitHostPort(s.advAddr); err == nil && net.ParseIP(host).IsUnspecified() {
			return fmt.Errorf("%w: listening on %s needs an advertise address that others can reach", ErrInvalidConfig, s.advAddr)
		}
	}
	var opts []grpc.ServerOption
	if s.cfg.TLS != nil {
		s.lis = certs.NewListener(s.lis, s.cfg.TLS, s.log)
		opts = Policy.ServerOptions()
	}
	s.grpc = grpc.NewServer(append(opts, grpc.ChainUnaryInterceptor(s.leaderInterceptor))...)
	registerServices(s.grpc, s)
	go func() { _ = s.grpc.Serve(s.lis) }()
	if s.http, err = httpdebug.Serve(s.cfg.MetricsAddr, httpdebug.Handler(s.registry, s.health), s.log); err != nil {
		return fmt.Errorf("mds: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.cancel = cancel
	s.done = make(chan struct{})
	go s.campaignLoop(runCtx)
	s.log.Info("mds started", "addr", s.advAddr, "metrics", s.MetricsAddr(), "etcd", endpoints,
		"chunk_size", s.consts.ChunkSize, "segment_size", s.consts.SegmentSize, "block_size", s.consts.BlockSize,
		"epoch_lease", s.cfg.EpochLease)
	if failover := s.cfg.ElectionTTL + s.cfg.HeartbeatInterval; s.cfg.EpochLease < failover {
		s.log.Warn("the epoch lease is shorter than an MDS failover: writes pause on every chunkserver while a new MDS leader takes over",
			"epoch_lease", s.cfg.EpochLease, "election_ttl", s.cfg.ElectionTTL, "heartbeat_interval", s.cfg.HeartbeatInterval)
	}
	return nil
}

// initConstants stores the cluster constants on first start or checks the
// configured ones against the stored ones.
func (s *Server) initConstants(ctx context.Context) error {
	key := s.keys.constants()
	for {
		var stored mdspb.ClusterConstants
		st := &store{cli: s.cli, k: s.keys}
		found, _, err := st.get(ctx, key, &stored)
		if err != nil {
			return fmt.Errorf("mds: read cluster constants: %w", err)
		}
		var have *mdspb.ClusterConstants
		if found {
			have = &stored
		}
		c, err := resolveConstants(s.cfg.Constants, have)
		if err != nil {
			return err
		}
		if found {
			s.consts = c
			return nil
		}
		resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).Then(putOp(key, c)).Commit()
		if err != nil {
			return fmt.Errorf("mds: store cluster constants: %w", err)
		}
		if resp.Succeeded {
			s.consts = c
			s.log.Info("cluster constants stored", "chunk_size", c.ChunkSize, "segment_size", c.SegmentSize,
				"block_size", c.BlockSize, "meta_page_size", c.MetaPageSize)
			return nil
		}
		// Another MDS stored them first: check against those.
	}
}

// campaignLoop campaigns for leadership, serves while leading, and campaigns
// again when the leadership is lost, until Stop.
func (s *Server) campaignLoop(ctx context.Context) {
	defer close(s.done)
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := s.campaignOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Warn("election", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

func (s *Server) campaignOnce(ctx context.Context) error {
	ttl := int(s.cfg.ElectionTTL.Round(time.Second) / time.Second)
	sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(ttl), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("session: %w", err)
	}
	abandon := false
	defer func() {
		if abandon {
			sess.Orphan()
			return
		}
		_ = sess.Close() // revokes the lease, dropping the election key
	}()
	el := concurrency.NewElection(sess, s.keys.election())
	if err := el.Campaign(ctx, s.advAddr); err != nil {
		if ctx.Err() != nil {
			abandon = s.cfg.TestingKnobs.AbandonLeadershipOnStop
		}
		return fmt.Errorf("campaign: %w", err)
	}
	guard := clientv3.Compare(clientv3.CreateRevision(el.Key()), "=", el.Rev())
	st := newLeaderState(s, &store{cli: s.cli, k: s.keys, guard: guard})
	if err := st.load(ctx); err != nil {
		st.stop()
		return fmt.Errorf("load state as new leader: %w", err)
	}
	s.mu.Lock()
	s.mu.leader = st
	s.mu.Unlock()
	s.log.Info("leading", "addr", s.advAddr)
	st.startBackground()
	st.startScheduler()
	select {
	case <-sess.Done():
		s.log.Warn("leadership lost: etcd session expired")
	case <-st.stepDown:
	case <-ctx.Done():
	}
	s.mu.Lock()
	s.mu.leader = nil
	s.mu.Unlock()
	st.stop()
	if ctx.Err() != nil {
		abandon = s.cfg.TestingKnobs.AbandonLeadershipOnStop
	}
	if !abandon {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = el.Resign(rctx)
		cancel()
	}
	return nil
}

// leader returns the current leader state, or nil.
func (s *Server) leader() *leaderState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.leader
}

// Leading reports whether this MDS is the elected leader and serving.
func (s *Server) Leading() bool { return s.leader() != nil }

// Addr returns the address this MDS advertises (its gRPC address).
func (s *Server) Addr() string { return s.advAddr }

// MetricsAddr returns the bound address of /metrics and /healthz, or "".
func (s *Server) MetricsAddr() string { return s.http.Addr() }

// EtcdEndpoints returns the etcd client URLs this MDS uses (the embedded
// etcd's when it runs one), so that other MDS processes can share it in tests.
func (s *Server) EtcdEndpoints() []string {
	if s.etcd != nil {
		return s.etcd.Endpoints()
	}
	return append([]string(nil), s.cfg.EtcdEndpoints...)
}

// Constants returns the cluster constants in force.
func (s *Server) Constants() *mdspb.ClusterConstants { return proto.CloneOf(s.consts) }

// LeaderAddress asks etcd which MDS leads ("" when none does).
func (s *Server) LeaderAddress(ctx context.Context) (string, error) {
	resp, err := s.cli.Get(ctx, s.keys.election(), clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("mds: find leader: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}

// Stop leaves the election (resigning, so another MDS takes over at once),
// stops serving and closes etcd. It is safe to call more than once.
func (s *Server) Stop() {
	s.mu.Lock()
	if s.mu.stopped {
		s.mu.Unlock()
		return
	}
	s.mu.stopped = true
	s.mu.Unlock()
	if s.cancel != nil {
		s.cancel()
		<-s.done
	}
	s.closeResources()
	s.log.Info("mds stopped", "addr", s.advAddr)
}

func (s *Server) closeResources() {
	if s.grpc != nil {
		stopped := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(3 * time.Second):
			s.grpc.Stop()
		}
	} else if s.lis != nil {
		_ = s.lis.Close()
	}
	hctx, hcancel := context.WithTimeout(context.Background(), 2*time.Second)
	s.http.Close(hctx)
	hcancel()
	s.conns.Close()
	if s.cli != nil {
		_ = s.cli.Close()
	}
	if s.etcd != nil {
		s.etcd.Close()
	}
}

// health is the /healthz answer: ok when etcd is reachable, naming the role;
// otherwise why not.
func (s *Server) health(ctx context.Context) (string, error) {
	if _, err := s.cli.Get(ctx, s.keys.constants()); err != nil {
		return "", fmt.Errorf("etcd unreachable: %w", err)
	}
	if s.Leading() {
		return "ok leader", nil
	}
	return "ok follower", nil
}
