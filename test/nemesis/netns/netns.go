// Package netns builds a private network of Linux network namespaces for the
// fault-injection suite (test/nemesis): one namespace per process, each
// with a veth link to a bridge that lives in a namespace of its own, with
// addresses in a private /24 and no default route. Nothing is configured
// outside the namespaces it creates: the veth pairs are created directly
// between the bridge's namespace and each host's.
//
// Partitions are nftables rules inside a host's namespace that drop every
// packet to and from chosen peers (both directions, so established TCP
// connections hang as on a real network split); healing deletes the
// rules' table. Everything is removed by Destroy, and namespaces left by a
// process that died without cleaning up are removed by RemoveStale.
package netns

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Tools are the programs the package runs.
var Tools = []string{"ip", "nft", "nsenter"}

// Available reports why namespaces cannot be built here (not root, a tool
// missing), or nil.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root")
	}
	for _, t := range Tools {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%s is not installed (Debian packages: iproute2, nftables, util-linux)", t)
		}
	}
	return nil
}

// Host is one namespace of the network, with one address.
type Host struct {
	Name string // the name the caller gave
	NS   string // the namespace's name (under /run/netns)
	Addr string // IPv4 address on the bridge
}

// Path is the namespace's file, for nsenter --net.
func (h *Host) Path() string { return "/run/netns/" + h.NS }

// Command returns a command that runs bin inside the host's namespace.
// nsenter execs bin, so the command's pid is bin's own.
func (h *Host) Command(bin string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + h.Path(), "--", bin}, args...)...)
}

// Net is a built network.
type Net struct {
	prefix string
	bridge string // namespace of the bridge
	hosts  map[string]*Host
	order  []string

	mu  sync.Mutex
	cut map[[2]string]bool // host pairs (sorted) with drop rules
}

// Create builds a network named prefix (which must be unique on the
// machine: namespaces are global) with one host per name, at subnet.N for
// N = first, first+1, ... (subnet is the first three octets, such as
// "10.77.0"). On failure everything created is removed again.
func Create(prefix, subnet string, first int, names []string) (n *Net, err error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if first < 2 || first+len(names) > 254 {
		return nil, fmt.Errorf("netns: %d hosts from .%d do not fit a /24", len(names), first)
	}
	n = &Net{prefix: prefix, bridge: prefix + "-br", hosts: map[string]*Host{}, cut: map[[2]string]bool{}}
	defer func() {
		if err != nil {
			_ = n.Destroy()
		}
	}()
	if err := run("ip", "netns", "add", n.bridge); err != nil {
		return n, err
	}
	for _, c := range [][]string{
		{"ip", "-n", n.bridge, "link", "set", "lo", "up"},
		{"ip", "-n", n.bridge, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", n.bridge, "link", "set", "br0", "up"},
	} {
		if err := run(c...); err != nil {
			return n, err
		}
	}
	for i, name := range names {
		if _, dup := n.hosts[name]; dup {
			return n, fmt.Errorf("netns: host %q named twice", name)
		}
		h := &Host{Name: name, NS: fmt.Sprintf("%s-%s", prefix, name), Addr: fmt.Sprintf("%s.%d", subnet, first+i)}
		if err := run("ip", "netns", "add", h.NS); err != nil {
			return n, err
		}
		n.hosts[name] = h
		n.order = append(n.order, name)
		veth := fmt.Sprintf("vh%d", i)
		for _, c := range [][]string{
			{"ip", "-n", n.bridge, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.NS},
			{"ip", "-n", n.bridge, "link", "set", veth, "master", "br0", "up"},
			{"ip", "-n", h.NS, "link", "set", "lo", "up"},
			{"ip", "-n", h.NS, "addr", "add", h.Addr + "/24", "dev", "eth0"},
			{"ip", "-n", h.NS, "link", "set", "eth0", "up"},
		} {
			if err := run(c...); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// Open describes a network that Create built in another process (same
// prefix, subnet, first address and names), checking that its namespaces
// exist. The caller may cut and heal links; Destroy stays with the creator.
func Open(prefix, subnet string, first int, names []string) (*Net, error) {
	n := &Net{prefix: prefix, bridge: prefix + "-br", hosts: map[string]*Host{}, cut: map[[2]string]bool{}}
	for i, name := range names {
		h := &Host{Name: name, NS: fmt.Sprintf("%s-%s", prefix, name), Addr: fmt.Sprintf("%s.%d", subnet, first+i)}
		if _, err := os.Stat(h.Path()); err != nil {
			return nil, fmt.Errorf("netns: namespace of %s: %w", name, err)
		}
		n.hosts[name] = h
		n.order = append(n.order, name)
	}
	return n, nil
}

// Host returns the named host, or nil.
func (n *Net) Host(name string) *Host { return n.hosts[name] }

// Hosts returns every host in creation order.
func (n *Net) Hosts() []*Host {
	out := make([]*Host, 0, len(n.order))
	for _, name := range n.order {
		out = append(out, n.hosts[name])
	}
	return out
}

// Destroy removes every namespace of the network (which removes its links
// and rules with it) and reports what could not be removed.
func (n *Net) Destroy() error {
	var errs []error
	for _, name := range n.order {
		if err := run("ip", "netns", "del", n.hosts[name].NS); err != nil {
			errs = append(errs, err)
		}
	}
	n.order, n.hosts = nil, map[string]*Host{}
	if err := run("ip", "netns", "del", n.bridge); err != nil && !strings.Contains(err.Error(), "No such file") {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

const table = "nemesis"

// Cut drops every packet between host a and each of others, in both
// directions, with rules in a's namespace. Cutting a cut pair is a no-op.
func (n *Net) Cut(a string, others ...string) error {
	ha := n.hosts[a]
	if ha == nil {
		return fmt.Errorf("netns: no host %q", a)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	var script bytes.Buffer
	fmt.Fprintf(&script, "add table inet %s\n", table)
	fmt.Fprintf(&script, "add chain inet %s in { type filter hook input priority 0; policy accept; }\n", table)
	fmt.Fprintf(&script, "add chain inet %s out { type filter hook output priority 0; policy accept; }\n", table)
	var added [][2]string
	for _, b := range others {
		hb := n.hosts[b]
		if hb == nil {
			return fmt.Errorf("netns: no host %q", b)
		}
		if a == b {
			return fmt.Errorf("netns: cannot cut %s from itself", a)
		}
		fmt.Fprintf(&script, "add rule inet %s in ip saddr %s drop\n", table, hb.Addr)
		fmt.Fprintf(&script, "add rule inet %s out ip daddr %s drop\n", table, hb.Addr)
		added = append(added, pair(a, b))
	}
	if err := nft(ha, script.String()); err != nil {
		return err
	}
	for _, p := range added {
		n.cut[p] = true
	}
	return nil
}

// HealAll deletes every rule Cut added.
func (n *Net) HealAll() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	var errs []error
	for _, name := range n.order {
		h := n.hosts[name]
		// The table exists only where Cut put one.
		out, err := exec.Command("nsenter", "--net="+h.Path(), "--", "nft", "list", "tables").CombinedOutput()
		if err != nil {
			errs = append(errs, fmt.Errorf("nft list tables in %s: %v: %s", h.NS, err, out))
			continue
		}
		if strings.Contains(string(out), "inet "+table) {
			if err := nft(h, "delete table inet "+table+"\n"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) == 0 {
		n.cut = map[[2]string]bool{}
	}
	return errors.Join(errs...)
}

// Cuts lists the cut pairs ("a|b", sorted).
func (n *Net) Cuts() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for p := range n.cut {
		out = append(out, p[0]+"|"+p[1])
	}
	sort.Strings(out)
	return out
}

func pair(a, b string) [2]string {
	if a > b {
		a, b = b, a
	}
	return [2]string{a, b}
}

func nft(h *Host, script string) error {
	cmd := exec.Command("nsenter", "--net="+h.Path(), "--", "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s (script:\n%s)", h.NS, err, bytes.TrimSpace(out), script)
	}
	return nil
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// PIDPrefix names a network after a process: prefix "<base><pid>", which
// RemoveStale recognises.
func PIDPrefix(base string, pid int) string { return base + strconv.Itoa(pid) }

// RemoveStale deletes the namespaces named by PIDPrefix(base, pid) whose
// process no longer runs: what a test killed before its cleanup left.
func RemoveStale(base string) error {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("ip netns list: %w", err)
	}
	re := regexp.MustCompile("^" + regexp.QuoteMeta(base) + `([0-9]+)-\S+`)
	var errs []error
	for _, line := range strings.Split(string(out), "\n") {
		m := re.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		if _, err := os.Stat("/proc/" + m[1]); err == nil {
			continue // its process still runs
		}
		if err := run("ip", "netns", "del", m[0]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Do runs f on an OS thread that has entered the host's namespace, so that
// sockets f creates (listeners, dials) belong to that namespace; they keep
// working from any goroutine afterwards. The thread is discarded after f.
func (h *Host) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the goroutine's exit ends the thread, so no
		// other goroutine ever runs in the namespace.
		runtime.LockOSThread()
		fd, err := unix.Open(h.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("open %s: %w", h.Path(), err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter %s: %w", h.NS, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}
