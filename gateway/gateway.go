package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/iscsi"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/nbd"
)

// Default addresses and intervals.
const (
	// DefaultNBDAddr is the NBD listen address: the IANA NBD port on loopback.
	DefaultNBDAddr = nbd.DefaultAddr
	// DefaultISCSIAddr is the iSCSI portal: the IANA iSCSI port on loopback.
	DefaultISCSIAddr = iscsi.DefaultAddr
	// DefaultMetricsAddr serves /metrics and /healthz.
	DefaultMetricsAddr = "127.0.0.1:9300"
	// DefaultPollInterval is how often the MDS's volume list is polled.
	DefaultPollInterval = 3 * time.Second
	// DefaultLinger is how long a volume stays open after its last user left.
	DefaultLinger = 5 * time.Second
	// DefaultClientName names the gateway's volume sessions at the MDS.
	DefaultClientName = "cairn-gateway"
	// DefaultMDSWait is how long an NBD client or iSCSI initiator waits
	// for the MDS (a volume's open, the export list) before it is told
	// that the MDS does not answer: well within the NBD handshake (30 s)
	// and iSCSI login (15 s) timeouts, so that it hears why rather than a
	// timeout.
	DefaultMDSWait = 10 * time.Second
)

// Disabled, as an address, turns a listener off.
const Disabled = "-"

// Errors.
var (
	// ErrNotExported is returned for a volume that Config.Volumes leaves
	// out; it comes wrapped with blockdev.ErrNotFound, so the frontends
	// answer it as an unknown export or target.
	ErrNotExported = errors.New("gateway: volume not exported by this gateway")
	// ErrStopped is returned by Start after Stop, and by opens while the
	// gateway stops.
	ErrStopped = errors.New("gateway: stopped")
)

// Config configures a Gateway. Zero values take the defaults named.
type Config struct {
	// MDSAddrs are the MDS addresses (several for HA). Required.
	MDSAddrs []string
	// NBDAddr is the NBD listen address (default DefaultNBDAddr; Disabled
	// turns NBD off; port 0 picks a free port, see NBDAddr).
	NBDAddr string
	// ISCSIAddr is the iSCSI portal (default DefaultISCSIAddr; Disabled
	// turns iSCSI off).
	ISCSIAddr string
	// MetricsAddr serves /metrics and /healthz (default DefaultMetricsAddr;
	// Disabled turns it off).
	MetricsAddr string
	// Volumes, when not empty, restricts the exports to these names.
	Volumes []string
	// PollInterval is how often the volume list is read from the MDS to
	// notice deleted and grown volumes (default 3 s).
	PollInterval time.Duration
	// Linger keeps a volume open this long after its last user left
	// (default 5 s; negative closes at once).
	Linger time.Duration
	// ClientName names the gateway's sessions at the MDS (ListSessions).
	ClientName string
	// MDSWait bounds how long a user (an NBD handshake, an iSCSI login)
	// waits for the MDS: for a volume's open or the export list. Past it
	// the user gets an error wrapping blockdev.ErrUnavailable that names the
	// MDS (default DefaultMDSWait). An open goes on in the background, and
	// a user that retries joins it.
	MDSWait time.Duration
	// VolumeMaxInflightBytes bounds the data of the chunk requests in
	// flight for each open volume (client.Options.MaxInflightBytes;
	// default client.DefaultMaxInflightBytes, 64 MiB). IO beyond it waits.
	VolumeMaxInflightBytes int64
	// NBD and ISCSI tune the frontends; Exports, Logger and listen
	// addresses are set by the gateway. NBD.MultiConn is always on: a
	// Cairn write is durable when it returns, and all connections to a
	// volume share one open volume.
	NBD   nbd.Config
	ISCSI iscsi.Config
	// OpenVolume opens a volume for writing. The default opens it through
	// the client library. Tests substitute it to observe opens; it must
	// wrap blockdev.ErrNotFound when the volume does not exist.
	OpenVolume func(ctx context.Context, name string) (blockdev.Device, error)
	// TLS is the gateway's identity (a certificate with the client role)
	// towards the MDS and the chunkservers; nil: plaintext.
	TLS *certs.Source
	// NBDTLS is what NBD clients get: NBDTLSOff (no NBD_OPT_STARTTLS),
	// NBDTLSAllow (TLS for clients that ask, plaintext for the others) or
	// NBDTLSRequire. With TLS, an NBD client must present a certificate
	// of the CA with the client or operator role, and the gateway
	// presents its own (which must name the host clients dial). Default:
	// allow when TLS is set, else off.
	NBDTLS string
	// Logger receives structured logs (default slog.Default()).
	Logger *slog.Logger
}

// The NBD TLS modes (Config.NBDTLS).
const (
	NBDTLSOff     = "off"
	NBDTLSAllow   = "allow"
	NBDTLSRequire = "require"
)

// Gateway serves a cluster's volumes over NBD and iSCSI.
type Gateway struct {
	cfg     Config
	log     *slog.Logger
	mds     *mdsclient.Conn
	vols    *registry
	nbd     *nbd.Server
	iscsi   *iscsi.Server
	metrics *metrics
	allow   map[string]bool // nil: every volume

	ctx    context.Context // cancelled by Stop
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu struct {
		sync.Mutex
		started, stopped bool
		nbdLn, iscsiLn   net.Listener
		metricsLn        net.Listener
		http             *http.Server
	}
	stopOnce sync.Once
}

// New checks cfg and returns a gateway that is not serving yet.
func New(cfg Config) (*Gateway, error) {
	var addrs []string
	for _, a := range cfg.MDSAddrs {
		for _, p := range strings.Split(a, ",") {
			if p = strings.TrimSpace(p); p != "" {
				addrs = append(addrs, p)
			}
		}
	}
	if len(addrs) == 0 {
		return nil, errors.New("gateway: config: no MDS address")
	}
	cfg.MDSAddrs = addrs
	if cfg.NBDAddr == "" {
		cfg.NBDAddr = DefaultNBDAddr
	}
	if cfg.ISCSIAddr == "" {
		cfg.ISCSIAddr = DefaultISCSIAddr
	}
	if cfg.MetricsAddr == "" {
		cfg.MetricsAddr = DefaultMetricsAddr
	}
	switch {
	case cfg.NBDTLS == "" && cfg.TLS != nil:
		cfg.NBDTLS = NBDTLSAllow
	case cfg.NBDTLS == "":
		cfg.NBDTLS = NBDTLSOff
	case cfg.NBDTLS != NBDTLSOff && cfg.NBDTLS != NBDTLSAllow && cfg.NBDTLS != NBDTLSRequire:
		return nil, fmt.Errorf("gateway: NBD TLS mode %q: want off, allow or require", cfg.NBDTLS)
	case cfg.NBDTLS != NBDTLSOff && cfg.TLS == nil:
		return nil, fmt.Errorf("gateway: NBD TLS %s needs the gateway's certificate (--tls-cert, --tls-key, --tls-ca)", cfg.NBDTLS)
	}
	if cfg.NBDAddr == Disabled && cfg.ISCSIAddr == Disabled {
		return nil, errors.New("gateway: config: both NBD and iSCSI are disabled; nothing to serve")
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.PollInterval < 0 {
		return nil, fmt.Errorf("gateway: config: poll interval %v must be positive", cfg.PollInterval)
	}
	if cfg.Linger == 0 {
		cfg.Linger = DefaultLinger
	}
	if cfg.ClientName == "" {
		cfg.ClientName = DefaultClientName
	}
	if cfg.MDSWait == 0 {
		cfg.MDSWait = DefaultMDSWait
	}
	if cfg.MDSWait < 0 {
		return nil, fmt.Errorf("gateway: config: MDS wait %v must be positive", cfg.MDSWait)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	g := &Gateway{cfg: cfg, log: cfg.Logger.With("component", "gateway")}
	if len(cfg.Volumes) > 0 {
		g.allow = map[string]bool{}
		for _, v := range cfg.Volumes {
			if v = strings.TrimSpace(v); v != "" {
				g.allow[v] = true
			}
		}
	}
	if g.cfg.OpenVolume == nil {
		g.cfg.OpenVolume = clientOpener(g.cfg, cfg.Logger)
	}
	conn, err := mdsclient.Dial(cfg.MDSAddrs, mdsclient.Options{Logger: g.log, RetryBudget: 10 * time.Second, TLS: cfg.TLS})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	g.mds = conn
	g.ctx, g.cancel = context.WithCancel(context.Background())
	g.metrics = newMetrics(g)
	g.vols = newRegistry(g)

	if cfg.NBDAddr != Disabled {
		nc := cfg.NBD
		nc.Exports = catalog{g}
		nc.Logger = cfg.Logger
		nc.MultiConn = true
		switch cfg.NBDTLS {
		case NBDTLSOff:
		case NBDTLSAllow, NBDTLSRequire:
			nc.TLS = cfg.TLS.ServerConfigFor(certs.RoleClient, certs.RoleOperator)
			nc.RequireTLS = cfg.NBDTLS == NBDTLSRequire
		}
		user := nc.OnRequest
		nc.OnRequest = func(ev nbd.RequestEvent) {
			g.metrics.observeNBD(ev)
			if user != nil {
				user(ev)
			}
		}
		if g.nbd, err = nbd.NewServer(nc); err != nil {
			conn.Close()
			return nil, fmt.Errorf("gateway: %w", err)
		}
	}
	if cfg.ISCSIAddr != Disabled {
		ic := cfg.ISCSI
		ic.Exports = catalog{g}
		ic.Addr = cfg.ISCSIAddr
		ic.Logger = cfg.Logger
		if g.iscsi, err = iscsi.NewServer(ic); err != nil {
			conn.Close()
			return nil, fmt.Errorf("gateway: %w", err)
		}
	}
	return g, nil
}

// Start binds every configured listener, then serves in the background and
// starts polling the MDS. It fails, binding nothing, if an address is taken.
// The MDS need not be reachable yet: exports appear once it is.
func (g *Gateway) Start(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.mu.stopped {
		return ErrStopped
	}
	if g.mu.started {
		return errors.New("gateway: already started")
	}
	var lns []net.Listener
	listen := func(what, addr string) (net.Listener, error) {
		if addr == Disabled {
			return nil, nil
		}
		var lc net.ListenConfig
		ln, err := lc.Listen(ctx, "tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("gateway: listen %s on %s: %w", what, addr, err)
		}
		lns = append(lns, ln)
		return ln, nil
	}
	nbdLn, err := listen("NBD", g.cfg.NBDAddr)
	if err != nil {
		return err
	}
	iscsiLn, err := listen("iSCSI", g.cfg.ISCSIAddr)
	if err != nil {
		return err
	}
	metricsLn, err := listen("metrics", g.cfg.MetricsAddr)
	if err != nil {
		return err
	}
	g.mu.nbdLn, g.mu.iscsiLn, g.mu.metricsLn = nbdLn, iscsiLn, metricsLn
	g.mu.started = true
	if ln := g.mu.nbdLn; ln != nil {
		g.serve("nbd", func() error { return g.nbd.Serve(ln) }, nbd.ErrServerClosed)
	}
	if ln := g.mu.iscsiLn; ln != nil {
		g.serve("iscsi", func() error { return g.iscsi.Serve(ln) }, iscsi.ErrServerClosed)
	}
	if ln := g.mu.metricsLn; ln != nil {
		g.mu.http = &http.Server{Handler: g.metrics.handler(), ReadHeaderTimeout: 5 * time.Second}
		srv := g.mu.http
		g.serve("metrics", func() error { return srv.Serve(ln) }, http.ErrServerClosed)
	}
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.pollLoop()
	}()
	g.log.Info("gateway started", "nbd", addrOf(g.mu.nbdLn), "iscsi", addrOf(g.mu.iscsiLn),
		"metrics", addrOf(g.mu.metricsLn), "mds", strings.Join(g.cfg.MDSAddrs, ","))
	return nil
}

// serve runs f in the background; an error other than closed is logged.
func (g *Gateway) serve(what string, f func() error, closed error) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		if err := f(); err != nil && !errors.Is(err, closed) {
			g.log.Error("serving stopped", "server", what, "err", err)
		}
	}()
}

// Stop stops accepting connections, lets the requests in flight complete
// and answer, then flushes and closes every open volume. It is safe to call
// more than once and before Start.
func (g *Gateway) Stop() error {
	var errs []error
	g.stopOnce.Do(func() {
		g.mu.Lock()
		g.mu.stopped = true
		httpSrv := g.mu.http
		g.mu.Unlock()
		g.log.Info("gateway stopping")
		g.cancel()
		if g.nbd != nil {
			if err := g.nbd.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close NBD server: %w", err))
			}
		}
		if g.iscsi != nil {
			if err := g.iscsi.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close iSCSI server: %w", err))
			}
		}
		if err := g.vols.closeAll(); err != nil {
			errs = append(errs, err)
		}
		if httpSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = httpSrv.Shutdown(ctx)
			cancel()
		}
		g.wg.Wait()
		g.mds.Close()
		g.log.Info("gateway stopped")
	})
	return errors.Join(errs...)
}

// NBDAddr returns the bound NBD address ("" when disabled or not started).
func (g *Gateway) NBDAddr() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return addrOf(g.mu.nbdLn)
}

// ISCSIAddr returns the bound iSCSI portal address.
func (g *Gateway) ISCSIAddr() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return addrOf(g.mu.iscsiLn)
}

// MetricsAddr returns the bound metrics address.
func (g *Gateway) MetricsAddr() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return addrOf(g.mu.metricsLn)
}

// TargetName returns the iSCSI target name (IQN) of a volume.
func (g *Gateway) TargetName(volume string) string {
	prefix := g.cfg.ISCSI.IQNPrefix
	if prefix == "" {
		prefix = iscsi.DefaultIQNPrefix
	}
	return iscsi.TargetNameOf(prefix, volume)
}

// NBDStats returns the NBD server's counters (zero when NBD is disabled).
func (g *Gateway) NBDStats() nbd.Stats {
	if g.nbd == nil {
		return nbd.Stats{}
	}
	return g.nbd.Stats()
}

// ISCSIStats returns the iSCSI server's counters (zero when disabled).
func (g *Gateway) ISCSIStats() iscsi.Stats {
	if g.iscsi == nil {
		return iscsi.Stats{}
	}
	return g.iscsi.Stats()
}

// OpenVolumes returns the names of the volumes the gateway holds open, with
// the number of users of each (0 while lingering).
func (g *Gateway) OpenVolumes() map[string]int { return g.vols.snapshot() }

func addrOf(ln net.Listener) string {
	if ln == nil {
		return ""
	}
	return ln.Addr().String()
}

// exported reports whether the gateway's volume filter admits name (a
// snapshot goes with its volume).
func (g *Gateway) exported(name string) bool {
	volume, _ := SplitSnapshot(name)
	return g.allow == nil || g.allow[volume]
}
