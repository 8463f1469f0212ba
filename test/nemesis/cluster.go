package nemesis

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/poll"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/test/faultfs"
	"cairn.io/cairn/test/nemesis/netns"
	"cairn.io/cairn/tools/playground"
)

// The network: one namespace per process on 10.77.0.0/24.
const (
	Subnet    = "10.77.0"
	FirstAddr = 2
	// NetBase prefixes the namespaces' names (followed by the creating
	// process's pid).
	NetBase = "cnem"
)

// Host names of the network, in address order: the test process (clients)
// first, then the MDS, the chunkservers and the gateway.
const (
	HostClient  = "client"
	HostMDS     = "mds"
	HostGateway = "gw"
)

// ChunkServers is the number of chunkservers: cs0..cs3 in zones 1, 2, 3, 1.
// Two share zone 1, so the MDS can rebuild a lost replica on another
// chunkserver while three zones stay covered.
const ChunkServers = 4

// Chunkservers with special disks: FaultCS's data directory is a faultfs
// mount (power cuts, fsync errors), FullCS's a small loop-mounted ext4 that
// the disk-full fault fills.
const (
	FaultCS = 1
	FullCS  = 2
)

// HostNames lists the hosts in address order.
func HostNames() []string {
	names := []string{HostClient, HostMDS}
	for i := range ChunkServers {
		names = append(names, csName(i))
	}
	return append(names, HostGateway)
}

func csName(i int) string { return fmt.Sprintf("cs%d", i) }

// Ports inside each namespace (every process has its own port space).
const (
	mdsPort     = 6700
	metricsPort = 9200
	etcdPort    = 6702
	csPort      = 8200
	nbdPort     = 10809
	iscsiPort   = 3260
)

// Volumes: the client library writes one, the NBD clients (through the
// gateway) the other, so that neither fences the other.
const (
	VolLib = "nemesis-lib"
	VolNBD = "nemesis-nbd"
	// VolSize is one segment (64 chunks of 1 MiB).
	VolSize   = 64 << 20
	chunkSize = 1 << 20
)

// Cluster is the running multi-process cluster.
type Cluster struct {
	Dir    string
	BinDir string
	Net    *netns.Net
	MDS    *Proc
	CS     []*Proc
	GW     *Proc
	// FS is FaultCS's faultfs mount; Disk is FullCS's loop filesystem.
	FS   *faultfs.FS
	Disk *LoopFS

	log func(format string, args ...any)
}

// MDSAddr is the MDS's gRPC address.
func (c *Cluster) MDSAddr() string { return addr(c.Net.Host(HostMDS), mdsPort) }

// NBDAddr is the gateway's NBD address.
func (c *Cluster) NBDAddr() string { return addr(c.Net.Host(HostGateway), nbdPort) }

// Procs lists every daemon.
func (c *Cluster) Procs() []*Proc {
	return append(append([]*Proc{c.MDS}, c.CS...), c.GW)
}

func addr(h *netns.Host, port int) string { return h.Addr + ":" + strconv.Itoa(port) }

// BuildBinaries builds the daemons into dir with the go command.
func BuildBinaries(dir string) error {
	args := []string{"build", "-o", dir + "/"}
	for _, b := range playground.Binaries {
		args = append(args, "cairn.io/cairn/cmd/"+b)
	}
	out, err := exec.Command("go", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build: %v: %s", err, out)
	}
	return nil
}

// NewCluster lays out the processes over net in dir: data directories,
// logs, command lines, FaultCS's faultfs mount and FullCS's loop
// filesystem. Nothing is started.
func NewCluster(dir, binDir string, net *netns.Net, logf func(string, ...any)) (*Cluster, error) {
	c := &Cluster{Dir: dir, BinDir: binDir, Net: net, log: logf}
	for _, d := range []string{"logs", "mds"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	bin := func(name string) string { return filepath.Join(binDir, name) }
	logOf := func(name string) string { return filepath.Join(dir, "logs", name+".log") }
	health := func(h *netns.Host) string { return "http://" + addr(h, metricsPort) + "/healthz" }

	mh := net.Host(HostMDS)
	c.MDS = &Proc{Name: "mds", LogPath: logOf("mds"), HealthURL: health(mh), log: logf, Command: func() *exec.Cmd {
		return mh.Command(bin("cairn-mds"), "--data-dir", filepath.Join(dir, "mds"),
			"--listen", addr(mh, mdsPort), "--metrics-listen", addr(mh, metricsPort),
			"--embedded-etcd-listen", "127.0.0.1:"+strconv.Itoa(etcdPort),
			"--chunk-size", "1MiB", "--segment-size", "64MiB",
			// Fast heartbeats: a 5 s epoch lease and a chunkserver
			// offline (and its replicas rebuilt elsewhere) after 10 s.
			"--heartbeat-interval", "1s", "--election-ttl", "2s", "--insecure")
	}}
	for i := range ChunkServers {
		name := csName(i)
		h := net.Host(name)
		data := filepath.Join(dir, name)
		switch i {
		case FaultCS:
			backing := filepath.Join(dir, name+"-backing")
			for _, d := range []string{backing, data} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					return nil, err
				}
			}
			fs, err := faultfs.Mount(backing, data, faultfs.Options{
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				return nil, fmt.Errorf("mount faultfs for %s: %w", name, err)
			}
			c.FS = fs
		case FullCS:
			disk, err := MountLoop(filepath.Join(dir, name+".img"), data, 384<<20)
			if err != nil {
				return nil, fmt.Errorf("loop filesystem for %s: %w", name, err)
			}
			c.Disk = disk
		default:
			if err := os.MkdirAll(data, 0o755); err != nil {
				return nil, err
			}
		}
		zone := fmt.Sprintf("zone%d", i%3+1)
		mdsAddr := c.MDSAddr()
		c.CS = append(c.CS, &Proc{Name: name, LogPath: logOf(name), HealthURL: health(h), log: logf, Command: func() *exec.Cmd {
			return h.Command(bin("cairn-chunkserver"), "--data-dir", data,
				"--listen", addr(h, csPort), "--metrics-listen", addr(h, metricsPort), "--mds", mdsAddr,
				"--zone", zone, "--hostname", "nemesis-"+name, "--physical-pool", playground.PhysicalPool,
				"--pool-size", "24MiB", "--pool-max", "192MiB", "--pool-reserve", "16MiB",
				"--memory-limit", "256MiB", "--insecure")
		}})
	}
	gh := net.Host(HostGateway)
	c.GW = &Proc{Name: "gateway", LogPath: logOf("gateway"), HealthURL: health(gh), log: logf, Command: func() *exec.Cmd {
		return gh.Command(bin("cairn-gateway"), "--mds", c.MDSAddr(),
			"--nbd-listen", addr(gh, nbdPort), "--iscsi-listen", addr(gh, iscsiPort),
			"--metrics-listen", addr(gh, metricsPort), "--volumes", VolNBD,
			"--client-name", "nemesis-gateway", "--linger", "2s", "--insecure")
	}}
	return c, nil
}

// Start starts the MDS, the chunkservers, creates the pool and the volumes,
// and starts the gateway, each waited for within ctx.
func (c *Cluster) Start(ctx context.Context) error {
	if err := c.MDS.Start(); err != nil {
		return err
	}
	if err := c.WaitHealthy(ctx, c.MDS); err != nil {
		return err
	}
	for _, p := range c.CS {
		if err := p.Start(); err != nil {
			return err
		}
	}
	conn, err := mdsclient.Dial([]string{c.MDSAddr()}, mdsclient.Options{Logger: quietLogger()})
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := poll.Until(ctx, "every chunkserver online", func() error { return c.allOnline(ctx, conn) }); err != nil {
		return err
	}
	var pool *mdspb.LogicalPool
	err = poll.Until(ctx, "the logical pool created", func() error {
		resp, err := conn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{
			Name: playground.LogicalPool, PhysicalPool: playground.PhysicalPool, CopysetsPerChunkserver: 6})
		if err != nil {
			return err
		}
		pool = resp.GetPool()
		return nil
	})
	if err != nil {
		return err
	}
	if err := c.WaitLeaders(ctx, conn, pool.GetId(), time.Time{}); err != nil {
		return err
	}
	for _, v := range []string{VolLib, VolNBD} {
		err := poll.Until(ctx, "volume "+v+" created", func() error {
			_, err := conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{
				Name: v, Size: VolSize, Owner: "nemesis", Pool: playground.LogicalPool})
			return err
		})
		if err != nil {
			return err
		}
	}
	if err := c.GW.Start(); err != nil {
		return err
	}
	return c.WaitHealthy(ctx, c.GW)
}

func (c *Cluster) allOnline(ctx context.Context, conn *mdsclient.Conn) error {
	online, err := conn.OnlineChunkServers(ctx)
	if err != nil {
		return err
	}
	for i := range c.CS {
		if a := addr(c.Net.Host(csName(i)), csPort); !online[a] {
			return fmt.Errorf("chunkserver %s (%s) not online", csName(i), a)
		}
	}
	return nil
}

// WaitLeaders waits until every copyset of the pool has a leader that
// reported after since.
func (c *Cluster) WaitLeaders(ctx context.Context, conn *mdsclient.Conn, pool uint32, since time.Time) error {
	return poll.Until(ctx, "every copyset led", func() error {
		resp, err := conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool})
		if err != nil {
			return err
		}
		if len(resp.GetCopysets()) == 0 {
			return errors.New("no copysets")
		}
		waiting := 0
		for _, cs := range resp.GetCopysets() {
			if cs.GetLeaderId() == 0 || cs.GetReportedUnix() < since.Unix() {
				waiting++
			}
		}
		if waiting > 0 {
			return fmt.Errorf("%d of %d copysets without a leader", waiting, len(resp.GetCopysets()))
		}
		return nil
	})
}

// Healthy waits until every daemon runs and answers /healthz, every
// chunkserver is online at the MDS and every copyset has a leader.
func (c *Cluster) Healthy(ctx context.Context) error {
	for _, p := range c.Procs() {
		if err := c.WaitHealthy(ctx, p); err != nil {
			return err
		}
	}
	conn, err := mdsclient.Dial([]string{c.MDSAddr()}, mdsclient.Options{Logger: quietLogger()})
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := poll.Until(ctx, "every chunkserver online", func() error { return c.allOnline(ctx, conn) }); err != nil {
		return err
	}
	return c.WaitLeaders(ctx, conn, 0, time.Time{})
}

// WaitHealthy waits until p runs and its /healthz answers 200.
func (c *Cluster) WaitHealthy(ctx context.Context, p *Proc) error {
	client := &http.Client{Timeout: 2 * time.Second}
	err := poll.Until(ctx, p.Name+" healthy", func() error {
		if !p.Running() {
			return fmt.Errorf("%s is not running", p.Name)
		}
		resp, err := client.Get(p.HealthURL)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %d %s", p.HealthURL, resp.StatusCode, strings.TrimSpace(string(b)))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w; last lines of %s:\n%s", err, p.LogPath, tail(p.LogPath, 10))
	}
	return nil
}

// Stop stops every daemon (gateway first) and unmounts the special disks.
func (c *Cluster) Stop() error {
	procs := c.Procs()
	for i := len(procs) - 1; i >= 0; i-- {
		if procs[i] != nil {
			procs[i].Stop(20 * time.Second)
		}
	}
	var errs []error
	if c.FS != nil {
		if err := c.FS.Unmount(); err != nil {
			errs = append(errs, fmt.Errorf("unmount faultfs: %w", err))
		}
	}
	if c.Disk != nil {
		if err := c.Disk.Unmount(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// Leaderships returns how many copysets each chunkserver leads, as the MDS
// last heard (indexed like c.CS).
func (c *Cluster) Leaderships(ctx context.Context) ([]int, error) {
	conn, err := mdsclient.Dial([]string{c.MDSAddr()}, mdsclient.Options{Logger: quietLogger(), RetryBudget: 10 * time.Second})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	css, err := conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return nil, err
	}
	index := map[uint64]int{}
	for _, cs := range css.GetChunkservers() {
		for i := range c.CS {
			if cs.GetAddress() == addr(c.Net.Host(csName(i)), csPort) {
				index[cs.GetId()] = i
			}
		}
	}
	sets, err := conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		return nil, err
	}
	out := make([]int, len(c.CS))
	for _, s := range sets.GetCopysets() {
		if i, ok := index[s.GetLeaderId()]; ok && s.GetLeaderId() != 0 {
			out[i]++
		}
	}
	return out, nil
}
