package playground

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/mds/mdsclient"
)

// Defaults of Config.
const (
	DefaultDir                    = ".playground"
	DefaultVolume                 = "vol0"
	DefaultVolumeSize             = 10 << 30
	DefaultCopysetsPerChunkServer = 100
	// DefaultPoolSize covers the chunks of the first GiB a volume is
	// written over, so that the first random writes into a fresh
	// playground (its fio example) find formatted files instead of waiting
	// for the pool to format them (seconds of tail latency).
	DefaultPoolSize     = 1 << 30
	DefaultPoolMax      = 4 << 30
	DefaultPoolReserve  = 1 << 30
	DefaultStopTimeout  = 20 * time.Second
	DefaultRecoverAfter = 30 * time.Second
	// LogicalPool and PhysicalPool name the pools the playground uses.
	LogicalPool  = "pool0"
	PhysicalPool = "pool1"
	// IQNPrefix is the prefix of the gateway's target names.
	IQNPrefix = "iqn.2026-11.io.cairn"
)

// Binaries the playground runs, looked up in Config.BinDir.
var Binaries = []string{"cairn-mds", "cairn-chunkserver", "cairn-gateway"}

// Config configures a playground. Zero values take the defaults named.
type Config struct {
	// Dir holds everything: data directories, logs, the state file
	// (default .playground). It is reused by the next start.
	Dir string
	// BinDir holds cairn-mds, cairn-chunkserver and cairn-gateway
	// (default: the directory of the running executable).
	BinDir string
	// Ports of the services (default DefaultPorts); they must name one
	// port per chunkserver.
	Ports *Ports
	// ChunkServersPerZone is the number of chunkservers in each of the
	// three zones (default 1, at most MaxChunkServersPerZone): with more
	// than one, recovery and balancing can be tried on one machine.
	ChunkServersPerZone int
	// RecoverAfter is how long the MDS waits for a lost chunkserver before
	// rebuilding its replicas elsewhere (default 30 s; production's
	// default is 10 min).
	RecoverAfter time.Duration
	// ChunkSize and SegmentSize set the cluster's geometry on its first
	// start (default: the MDS's, 16 MiB and 1 GiB). A later start with
	// other values is refused by the MDS.
	ChunkSize, SegmentSize uint64
	// CopysetsPerChunkServer for the logical pool (default 100, as in
	// production).
	CopysetsPerChunkServer uint32
	// PoolSize is formatted per chunkserver at its first start (default
	// 64 MiB); pools grow on demand up to PoolMax (default 4 GiB) and
	// always leave PoolReserve free on the disk (default 1 GiB).
	PoolSize, PoolMax, PoolReserve uint64
	// Volume is created with VolumeSize if absent (default vol0, 10 GiB).
	Volume     string
	VolumeSize uint64
	// StopTimeout is how long a child may take to stop after SIGTERM
	// before it gets SIGKILL (default 20 s).
	StopTimeout time.Duration
	// ReadyTimeout bounds Start (default 5 min).
	ReadyTimeout time.Duration
	// Insecure runs every process without TLS. By default the playground
	// keeps a CA in Dir/tls and gives each process a certificate.
	Insecure bool
	// Logger receives the playground's own messages (default: text to
	// stderr).
	Logger *slog.Logger
	// LogFormat is passed to every process as --log-format: "text" or
	// "json" (one object per line); "" leaves them their default (text,
	// or CAIRN_LOG_FORMAT from the environment).
	LogFormat string
	// LogLevel is passed to every process as --log-level ("" leaves them
	// their default: info, or CAIRN_LOG_LEVEL from the environment).
	LogLevel string
}

// Playground is a running local cluster: an MDS with embedded etcd, three
// chunkservers in three zones and a gateway, each its own process.
type Playground struct {
	cfg   Config
	ports Ports
	dir   string
	log   *slog.Logger
	lock  *os.File

	// tls names the certificate files (nil with Config.Insecure);
	// identity is the operator's, used by the playground itself.
	tls      *TLSState
	identity *certs.Source

	mds      *child
	css      []*child
	gateway  *child
	children []*child // in start order

	failed   chan struct{} // closed by fail
	failOnce sync.Once
	failErr  error

	mu struct {
		sync.Mutex
		ready     bool
		stopped   bool
		startedAt time.Time
		volume    VolumeState
	}
	stopOnce sync.Once
	stateMu  sync.Mutex // serialises state file writes
}

// New checks cfg, creates the directory and takes its lock: only one
// playground runs in a directory.
func New(cfg Config) (*Playground, error) {
	if cfg.Dir == "" {
		cfg.Dir = DefaultDir
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	if cfg.BinDir == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("find binaries: %w", err)
		}
		cfg.BinDir = filepath.Dir(exe)
	}
	// Children run in the playground's directory: name them absolutely.
	if cfg.BinDir, err = filepath.Abs(cfg.BinDir); err != nil {
		return nil, err
	}
	for _, b := range Binaries {
		p := filepath.Join(cfg.BinDir, b)
		if st, err := os.Stat(p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("%s not found in %s (build them with make build, or name their directory with --bin-dir)", b, cfg.BinDir)
		}
	}
	if cfg.ChunkServersPerZone == 0 {
		cfg.ChunkServersPerZone = 1
	}
	if cfg.ChunkServersPerZone < 0 || cfg.ChunkServersPerZone > MaxChunkServersPerZone {
		return nil, fmt.Errorf("%d chunkservers per zone: want 1..%d", cfg.ChunkServersPerZone, MaxChunkServersPerZone)
	}
	if cfg.RecoverAfter == 0 {
		cfg.RecoverAfter = DefaultRecoverAfter
	}
	n := Zones * cfg.ChunkServersPerZone
	ports := DefaultPorts(n)
	if cfg.Ports != nil {
		ports = *cfg.Ports
	}
	if err := ports.validate(n); err != nil {
		return nil, err
	}
	if cfg.Volume == "" {
		cfg.Volume = DefaultVolume
	}
	if cfg.VolumeSize == 0 {
		cfg.VolumeSize = DefaultVolumeSize
	}
	if cfg.CopysetsPerChunkServer == 0 {
		cfg.CopysetsPerChunkServer = DefaultCopysetsPerChunkServer
	}
	if cfg.PoolSize == 0 {
		cfg.PoolSize = DefaultPoolSize
	}
	if cfg.PoolMax == 0 {
		cfg.PoolMax = DefaultPoolMax
	}
	if cfg.PoolReserve == 0 {
		cfg.PoolReserve = DefaultPoolReserve
	}
	if cfg.PoolMax < cfg.PoolSize {
		return nil, fmt.Errorf("pool max %s is below the initial pool size %s",
			units.FormatBytes(cfg.PoolMax), units.FormatBytes(cfg.PoolSize))
	}
	if cfg.StopTimeout == 0 {
		cfg.StopTimeout = DefaultStopTimeout
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = 5 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	switch cfg.LogFormat {
	case "", "text", "json":
	default:
		return nil, fmt.Errorf("log format %q: want text or json", cfg.LogFormat)
	}
	for _, d := range []string{dir, filepath.Join(dir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	pg := &Playground{cfg: cfg, ports: ports, dir: dir, log: cfg.Logger, failed: make(chan struct{})}
	if err := pg.takeLock(); err != nil {
		return nil, err
	}
	var ids map[string]certs.Files
	if !cfg.Insecure {
		var err error
		if ids, pg.tls, err = pg.issueCerts(); err != nil {
			pg.lock.Close()
			return nil, err
		}
		if pg.identity, err = certs.Load(ids["operator"], slog.New(slog.DiscardHandler)); err != nil {
			pg.lock.Close()
			return nil, err
		}
	}
	pg.buildChildren(ids)
	return pg, nil
}

// takeLock holds an exclusive flock on <dir>/playground.lock while the
// playground lives.
func (pg *Playground) takeLock() error {
	f, err := os.OpenFile(filepath.Join(pg.dir, "playground.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("lock %s: %w", pg.dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		who := ""
		if st, err := ReadState(pg.dir); err == nil {
			who = fmt.Sprintf(" (pid %d)", st.PID)
		}
		return fmt.Errorf("another playground runs in %s%s: stop it first", pg.dir, who)
	}
	pg.lock = f
	return nil
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

func (pg *Playground) mdsAddr() string { return loopback(pg.ports.MDS) }

// buildChildren lays out the processes and their command lines; ids are
// the processes' certificates (nil: insecure).
func (pg *Playground) buildChildren(ids map[string]certs.Files) {
	idOf := func(name string) []string {
		if ids == nil {
			return tlsArgs(nil)
		}
		f := ids[name]
		return tlsArgs(&f)
	}
	bin := func(name string) string { return filepath.Join(pg.cfg.BinDir, name) }
	logOf := func(name string) string { return filepath.Join(pg.dir, "logs", name+".log") }
	p := pg.ports

	mdsDir := filepath.Join(pg.dir, "mds")
	mdsArgs := []string{"--data-dir", mdsDir, "--listen", loopback(p.MDS), "--metrics-listen", loopback(p.MDSMetrics),
		"--embedded-etcd-listen", loopback(p.Etcd), "--recover-after", pg.cfg.RecoverAfter.String()}
	mdsArgs = append(mdsArgs, idOf("mds")...)
	if pg.cfg.ChunkSize != 0 {
		mdsArgs = append(mdsArgs, "--chunk-size", strconv.FormatUint(pg.cfg.ChunkSize, 10))
	}
	if pg.cfg.SegmentSize != 0 {
		mdsArgs = append(mdsArgs, "--segment-size", strconv.FormatUint(pg.cfg.SegmentSize, 10))
	}
	pg.mds = newChild(pg, "mds", bin("cairn-mds"), mdsArgs, ProcessState{
		Addr: loopback(p.MDS), MetricsAddr: loopback(p.MDSMetrics), DataDir: mdsDir, Log: logOf("mds")})
	pg.children = append(pg.children, pg.mds)

	for i := range p.ChunkServer {
		name := fmt.Sprintf("cs%d", i)
		dataDir := filepath.Join(pg.dir, name)
		zone := fmt.Sprintf("zone%d", i%Zones+1)
		args := []string{"--data-dir", dataDir, "--listen", loopback(p.ChunkServer[i]),
			"--metrics-listen", loopback(p.ChunkServerMetrics[i]), "--mds", pg.mdsAddr(),
			"--zone", zone, "--hostname", "playground-" + name, "--physical-pool", PhysicalPool,
			"--pool-size", strconv.FormatUint(pg.cfg.PoolSize, 10),
			"--pool-max", strconv.FormatUint(pg.cfg.PoolMax, 10),
			"--pool-reserve", strconv.FormatUint(pg.cfg.PoolReserve, 10)}
		args = append(args, idOf("chunkserver")...)
		c := newChild(pg, name, bin("cairn-chunkserver"), args, ProcessState{
			Addr: loopback(p.ChunkServer[i]), MetricsAddr: loopback(p.ChunkServerMetrics[i]),
			DataDir: dataDir, Zone: zone, Log: logOf(name)})
		pg.css = append(pg.css, c)
		pg.children = append(pg.children, c)
	}

	gwArgs := append([]string{"--mds", pg.mdsAddr(),
		"--nbd-listen", loopback(p.NBD), "--iscsi-listen", loopback(p.ISCSI),
		"--metrics-listen", loopback(p.GatewayMetrics), "--client-name", "cairn-playground-gateway"},
		idOf("gateway")...)
	pg.gateway = newChild(pg, "gateway", bin("cairn-gateway"), gwArgs,
		ProcessState{MetricsAddr: loopback(p.GatewayMetrics), Log: logOf("gateway")})
	pg.children = append(pg.children, pg.gateway)
	for _, c := range pg.children {
		if pg.cfg.LogFormat != "" {
			c.args = append(c.args, "--log-format", pg.cfg.LogFormat)
		}
		if pg.cfg.LogLevel != "" {
			c.args = append(c.args, "--log-level", pg.cfg.LogLevel)
		}
	}
}

// Start checks the ports, starts the MDS, the chunkservers, creates the
// logical pool and the volume if absent, starts the gateway, and returns
// once everything serves. On failure everything started is stopped again.
func (pg *Playground) Start(ctx context.Context) error {
	pg.mu.Lock()
	if pg.mu.stopped {
		pg.mu.Unlock()
		return errors.New("playground stopped")
	}
	pg.mu.startedAt = time.Now()
	pg.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, pg.cfg.ReadyTimeout)
	defer cancel()
	// A child that dies during startup fails the whole start.
	go func() {
		select {
		case <-pg.failed:
			cancel()
		case <-ctx.Done():
		}
	}()
	err := pg.start(ctx)
	if err != nil {
		if ferr := pg.Err(); ferr != nil {
			err = ferr
		}
		pg.Stop()
		return err
	}
	pg.mu.Lock()
	pg.mu.ready = true
	pg.mu.Unlock()
	pg.saveState()
	return nil
}

func (pg *Playground) start(ctx context.Context) error {
	if err := checkPorts(pg.ports); err != nil {
		return err
	}
	pg.log.Info("starting MDS", "addr", pg.mdsAddr(), "log", pg.mds.logPath)
	pg.mds.launch()
	if err := pg.waitHealthy(ctx, pg.mds, func(body string) bool { return strings.Contains(body, "leader") }); err != nil {
		return err
	}
	conn, err := mdsclient.Dial([]string{pg.mdsAddr()}, mdsclient.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), TLS: pg.identity})
	if err != nil {
		return err
	}
	defer conn.Close()

	pg.log.Info("starting chunkservers", "chunkservers", len(pg.css), "zones", Zones)
	for _, c := range pg.css {
		c.launch()
	}
	for _, c := range pg.css {
		if err := pg.waitHealthy(ctx, c, nil); err != nil {
			return err
		}
	}
	if err := pg.waitChunkServersOnline(ctx, conn); err != nil {
		return err
	}
	if err := pg.ensurePool(ctx, conn); err != nil {
		return err
	}
	if err := pg.ensureVolume(ctx, conn); err != nil {
		return err
	}
	pg.log.Info("starting gateway", "nbd", loopback(pg.ports.NBD), "iscsi", loopback(pg.ports.ISCSI))
	pg.gateway.launch()
	if err := pg.waitHealthy(ctx, pg.gateway, nil); err != nil {
		return err
	}
	for _, a := range []string{loopback(pg.ports.NBD), loopback(pg.ports.ISCSI)} {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", a)
		if err != nil {
			return fmt.Errorf("gateway does not accept connections on %s: %w", a, err)
		}
		c.Close()
	}
	return nil
}

func (pg *Playground) startedAt() time.Time {
	pg.mu.Lock()
	defer pg.mu.Unlock()
	return pg.mu.startedAt
}

func (pg *Playground) isReady() bool {
	pg.mu.Lock()
	defer pg.mu.Unlock()
	return pg.mu.ready
}

// fail records a fatal error (a child that cannot run) and wakes Done.
func (pg *Playground) fail(err error) {
	pg.failOnce.Do(func() {
		pg.failErr = err
		pg.log.Error("playground failed", "err", err)
		close(pg.failed)
	})
}

// Failed is closed when the playground cannot go on (a child could not be
// started, or died while starting); Err says why.
func (pg *Playground) Failed() <-chan struct{} { return pg.failed }

// Err returns the reason Failed was closed, or nil.
func (pg *Playground) Err() error {
	select {
	case <-pg.failed:
		return pg.failErr
	default:
		return nil
	}
}

// Stop stops the gateway (it flushes and closes its volumes), then the
// chunkservers, then the MDS: SIGTERM to each, SIGKILL after StopTimeout.
// It removes the state file and releases the directory.
func (pg *Playground) Stop() {
	pg.stopOnce.Do(func() {
		pg.mu.Lock()
		pg.mu.stopped = true
		pg.mu.Unlock()
		pg.log.Info("stopping the playground")
		pg.gateway.stop(pg.cfg.StopTimeout)
		var wg sync.WaitGroup
		for _, c := range pg.css {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.stop(pg.cfg.StopTimeout)
			}()
		}
		wg.Wait()
		pg.mds.stop(pg.cfg.StopTimeout)
		pg.stateMu.Lock()
		defer pg.stateMu.Unlock()
		if err := os.Remove(filepath.Join(pg.dir, StateFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
			pg.log.Warn("remove state file", "err", err)
		}
		pg.lock.Close() // releases the flock
		pg.log.Info("playground stopped")
	})
}

// State returns the playground's current state.
func (pg *Playground) State() State {
	pg.mu.Lock()
	st := State{
		PID:       os.Getpid(),
		Dir:       pg.dir,
		Ready:     pg.mu.ready,
		StartedAt: pg.mu.startedAt,
		MDS:       pg.mdsAddr(),
		NBD:       loopback(pg.ports.NBD),
		ISCSI:     loopback(pg.ports.ISCSI),
		Volume:    pg.mu.volume,
		TLS:       pg.tls,
	}
	pg.mu.Unlock()
	for _, c := range pg.children {
		st.Processes = append(st.Processes, c.snapshot())
	}
	return st
}

// BinDir returns the directory the binaries are taken from (absolute).
func (pg *Playground) BinDir() string { return pg.cfg.BinDir }

// Dir returns the playground's directory (absolute).
func (pg *Playground) Dir() string { return pg.dir }

// saveState writes the state file.
func (pg *Playground) saveState() {
	pg.stateMu.Lock()
	defer pg.stateMu.Unlock()
	pg.mu.Lock()
	stopped := pg.mu.stopped
	pg.mu.Unlock()
	if stopped {
		return
	}
	st := pg.State()
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		pg.log.Error("encode state", "err", err)
		return
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(pg.dir, StateFile), append(b, '\n'), 0o644); err != nil {
		pg.log.Warn("write state file", "err", err)
	}
}

// Running reports whether a playground runs in dir (holds its lock), and its
// process id when the state file names it.
func Running(dir string) (bool, int, error) {
	f, err := os.OpenFile(filepath.Join(dir, "playground.lock"), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return false, 0, nil
	}
	if err != nil {
		return false, 0, err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		pid := 0
		if st, err := ReadState(dir); err == nil {
			pid = st.PID
		}
		return true, pid, nil
	}
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false, 0, nil
}
