package playground

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Zones is the number of zones a playground spreads its chunkservers over:
// the fewest that place three replicas in three zones.
const Zones = 3

// MaxChunkServersPerZone bounds Config.ChunkServersPerZone (PortsFrom lays
// out room for that many).
const MaxChunkServersPerZone = 3

// Ports are the TCP ports of a playground's services, all on 127.0.0.1.
type Ports struct {
	MDS, MDSMetrics, Etcd int
	// ChunkServer and ChunkServerMetrics have one port per chunkserver.
	ChunkServer, ChunkServerMetrics []int
	NBD, ISCSI, GatewayMetrics      int
}

// DefaultPorts are the ports of docs/architecture.md for a playground of n
// chunkservers: MDS 6700/6701, embedded etcd 6702, chunkservers 8200+ and
// 9200+, iSCSI 3260, NBD 10809; the gateway's metrics on 9300.
func DefaultPorts(n int) Ports {
	p := Ports{MDS: 6700, MDSMetrics: 6701, Etcd: 6702, NBD: 10809, ISCSI: 3260, GatewayMetrics: 9300}
	for i := range n {
		p.ChunkServer = append(p.ChunkServer, 8200+i)
		p.ChunkServerMetrics = append(p.ChunkServerMetrics, 9200+i)
	}
	return p
}

// PortSpan is the number of ports PortsFrom uses above its base.
const PortSpan = 33

// PortsFrom lays every port of a playground of n chunkservers out above
// base, for running a playground beside another one (tests use free
// ranges): MDS base, its metrics base+1, etcd base+2, chunkserver i at
// base+10+i with metrics at base+20+i, NBD base+30, iSCSI base+31,
// gateway metrics base+32.
func PortsFrom(base, n int) (Ports, error) {
	if base < 1024 || base+PortSpan > 65536 {
		return Ports{}, fmt.Errorf("base port %d: want 1024..%d so that base+%d fits", base, 65536-PortSpan, PortSpan-1)
	}
	if n < 1 || n > Zones*MaxChunkServersPerZone {
		return Ports{}, fmt.Errorf("%d chunkservers: want 1..%d", n, Zones*MaxChunkServersPerZone)
	}
	p := Ports{MDS: base, MDSMetrics: base + 1, Etcd: base + 2, NBD: base + 30, ISCSI: base + 31, GatewayMetrics: base + 32}
	for i := range n {
		p.ChunkServer = append(p.ChunkServer, base+10+i)
		p.ChunkServerMetrics = append(p.ChunkServerMetrics, base+20+i)
	}
	return p, nil
}

// namedPort is a port with what the playground uses it for.
type namedPort struct {
	port int
	what string
}

func (p Ports) list() []namedPort {
	out := []namedPort{{p.MDS, "MDS gRPC"}, {p.MDSMetrics, "MDS metrics"}, {p.Etcd, "MDS embedded etcd"}}
	for i := range p.ChunkServer {
		out = append(out, namedPort{p.ChunkServer[i], fmt.Sprintf("chunkserver cs%d gRPC", i)})
	}
	for i := range p.ChunkServerMetrics {
		out = append(out, namedPort{p.ChunkServerMetrics[i], fmt.Sprintf("chunkserver cs%d metrics", i)})
	}
	return append(out, namedPort{p.NBD, "gateway NBD"}, namedPort{p.ISCSI, "gateway iSCSI"},
		namedPort{p.GatewayMetrics, "gateway metrics"})
}

func (p Ports) validate(n int) error {
	if len(p.ChunkServer) != n || len(p.ChunkServerMetrics) != n {
		return fmt.Errorf("ports: want %d chunkserver ports and %d metrics ports, have %d and %d",
			n, n, len(p.ChunkServer), len(p.ChunkServerMetrics))
	}
	seen := map[int]string{}
	for _, np := range p.list() {
		if np.port <= 0 || np.port > 65535 {
			return fmt.Errorf("ports: %s port %d is not a TCP port", np.what, np.port)
		}
		if other, dup := seen[np.port]; dup {
			return fmt.Errorf("ports: %s and %s both use port %d", other, np.what, np.port)
		}
		seen[np.port] = np.what
	}
	return nil
}

// ErrPortInUse is wrapped by Start when a port the playground needs is
// taken; the message names the port, its use and, when it can be found,
// the process holding it.
var ErrPortInUse = errors.New("port in use")

// checkPorts makes sure every port can be bound on loopback before anything
// starts.
func checkPorts(p Ports) error {
	var owners []string           // in order of first appearance
	held := map[string][]string{} // owner -> "port (use)"
	for _, np := range p.list() {
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(np.port)))
		if err != nil {
			who := portOwner(np.port)
			if who == "" {
				who = "another process"
			}
			if _, ok := held[who]; !ok {
				owners = append(owners, who)
			}
			held[who] = append(held[who], fmt.Sprintf("%d (%s)", np.port, np.what))
			continue
		}
		ln.Close()
	}
	if len(owners) == 0 {
		return nil
	}
	var problems []string
	for _, who := range owners {
		problems = append(problems, fmt.Sprintf("%s held by %s", strings.Join(held[who], ", "), who))
	}
	return fmt.Errorf("%w: %s; stop what holds them or choose other ports (--base-port)", ErrPortInUse, strings.Join(problems, "; "))
}

// portOwner names the process listening on a TCP port ("pid 42 (cairn-mds
// --data-dir ...)"), or "" when it cannot be found (another user's process
// without the rights to see it).
func portOwner(port int) string {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		for _, ino := range listeningInodes(f, port) {
			inodes[ino] = true
		}
	}
	if len(inodes) == 0 {
		return ""
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, pdir := range procs {
		fds, err := os.ReadDir(filepath.Join(pdir, "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			link, err := os.Readlink(filepath.Join(pdir, "fd", fd.Name()))
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			if inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] {
				return describeProcess(pdir)
			}
		}
	}
	return ""
}

// listeningInodes returns the socket inodes of a /proc/net/tcp{,6} table
// listening on port.
func listeningInodes(table string, port int) []string {
	f, err := os.Open(table)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "0A" { // 0A: LISTEN
			continue
		}
		i := strings.LastIndexByte(fields[1], ':')
		if i < 0 {
			continue
		}
		p, err := strconv.ParseUint(fields[1][i+1:], 16, 16)
		if err == nil && int(p) == port {
			out = append(out, fields[9])
		}
	}
	return out
}

func describeProcess(pdir string) string {
	pid := filepath.Base(pdir)
	cmdline, err := os.ReadFile(filepath.Join(pdir, "cmdline"))
	if err != nil || len(cmdline) == 0 {
		comm, _ := os.ReadFile(filepath.Join(pdir, "comm"))
		return fmt.Sprintf("pid %s (%s)", pid, strings.TrimSpace(string(comm)))
	}
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	args[0] = filepath.Base(args[0])
	s := strings.Join(args, " ")
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return fmt.Sprintf("pid %s (%s)", pid, s)
}

// FindFreeBase returns a base port for PortsFrom whose whole span can be
// bound right now. It searches outside the kernel's ephemeral port range
// (net.ipv4.ip_local_port_range), where other programs' listeners on port 0
// and outgoing connections take ports at any moment, starting at a point
// derived from seed so that concurrent callers spread out. Another process
// may still take a port before the playground binds it, which Start then
// reports.
func FindFreeBase(seed int) (int, error) {
	lo, hi := ephemeralRange()
	var bases []int
	for b := 10000; b+PortSpan <= 65536; b += PortSpan {
		if b+PortSpan <= lo || b > hi {
			bases = append(bases, b)
		}
	}
	if len(bases) == 0 {
		return 0, errors.New("no port range outside the ephemeral ports")
	}
	start := (seed%len(bases) + len(bases)) % len(bases)
	for i := range bases {
		base := bases[(start+i)%len(bases)]
		p, err := PortsFrom(base, Zones*MaxChunkServersPerZone)
		if err == nil && checkPorts(p) == nil {
			return base, nil
		}
	}
	return 0, errors.New("no free range of ports outside the ephemeral ports")
}

// ephemeralRange reads the kernel's ephemeral port range (default
// 32768-60999 when it cannot be read).
func ephemeralRange() (lo, hi int) {
	lo, hi = 32768, 60999
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return lo, hi
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return lo, hi
	}
	l, err1 := strconv.Atoi(f[0])
	h, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || l > h {
		return lo, hi
	}
	return l, h
}
