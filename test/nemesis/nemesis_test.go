package nemesis

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/test/faultfs"
	"cairn.io/cairn/test/nemesis/netns"
)

var (
	flagCycles = flag.Int("cycles", 0, "fault cycles (default: one of each fault kind, or the environment variable CYCLES)")
	flagSeed   = flag.Int64("seed", 0, "seed of the faults and the workload (default 1, or the environment variable SEED; make nemesis passes the time)")
	flagBin    = flag.String("bin", "", "directory with cairn-mds, cairn-chunkserver and cairn-gateway (default: built into a temporary directory)")
	flagKeep   = flag.String("keep", "", "directory for the run's logs and evidence (default: a temporary directory, kept only on failure)")
	flagFaults = flag.String("faults", "", "comma-separated fault kinds to draw from (default: all; for minimising a finding)")
)

// innerEnv names the network the inner process runs in.
const innerEnv = "CAIRN_NEMESIS_NET"

// TestNemesis runs the fault-injection suite. The test process builds the
// network namespaces, then runs itself again inside the clients' namespace
// (so that every connection it makes, the client library's included, goes
// over the private network), and removes the namespaces when that run ends.
func TestNemesis(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process fault injection; not in -short mode")
	}
	if prefix := os.Getenv(innerEnv); prefix != "" {
		runInner(t, prefix)
		return
	}
	requireEnv(t)
	cfg := configFromFlags(t)
	if err := netns.RemoveStale(NetBase); err != nil {
		t.Logf("removing stale namespaces: %v", err)
	}
	prefix := netns.PIDPrefix(NetBase, os.Getpid())
	net, err := netns.Create(prefix, Subnet, FirstAddr, HostNames())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := net.Destroy(); err != nil {
			t.Errorf("remove the network: %v", err)
		}
	})
	// The daemons are built here, outside the namespaces, where the go
	// command reaches everything it may need.
	bin := *flagBin
	if bin == "" {
		bin = t.TempDir()
		if err := BuildBinaries(bin); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"-test.run=^TestNemesis$", "-test.count=1", "-test.timeout=0",
		"-cycles=" + strconv.Itoa(cfg.Cycles), "-seed=" + strconv.FormatInt(cfg.Seed, 10), "-bin=" + bin}
	if *flagKeep != "" {
		args = append(args, "-keep="+*flagKeep)
	}
	if *flagFaults != "" {
		args = append(args, "-faults="+*flagFaults)
	}
	cmd := net.Host(HostClient).Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), innerEnv+"="+prefix)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	// The inner run dies with this process; its own daemons die with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			// Indented so that the inner test's own PASS/FAIL lines are
			// not taken for this test's.
			fmt.Println("    " + sc.Text())
		}
	}()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if dl, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-30*time.Second))
		defer cancel()
	}
	werr := make(chan error, 1)
	go func() { werr <- cmd.Wait() }()
	select {
	case err = <-werr:
	case <-ctx.Done():
		// SIGTERM first: the inner run cleans up its mounts on it.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err = <-werr:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			err = <-werr
		}
		err = fmt.Errorf("test deadline: %v", err)
	}
	pw.Close()
	<-done
	if err != nil {
		t.Fatalf("the nemesis run failed (%v); its output is above", err)
	}
}

// requireEnv skips (or, with CI set, fails) without root, FUSE, loop
// devices or a tool the suite runs.
func requireEnv(t *testing.T) {
	t.Helper()
	var problems []string
	if err := netns.Available(); err != nil {
		problems = append(problems, err.Error())
	}
	if err := faultfs.Available(); err != nil {
		problems = append(problems, "FUSE: "+err.Error())
	}
	for _, tool := range []string{"go", "mkfs.ext4", "mount", "umount", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			problems = append(problems, tool+" is not installed (Debian packages: e2fsprogs, mount)")
		}
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		problems = append(problems, "no loop devices (/dev/loop-control)")
	}
	if len(problems) == 0 {
		return
	}
	msg := "the nemesis needs root, network namespaces, nftables, FUSE and loop devices: " + strings.Join(problems, "; ")
	if os.Getenv("CI") != "" {
		t.Fatal("CI is set, so not skipping: " + msg)
	}
	t.Skip(msg)
}

// configFromFlags reads -cycles and -seed, or CYCLES and SEED.
func configFromFlags(t *testing.T) Config {
	cfg := Config{Cycles: *flagCycles, Seed: *flagSeed}
	if *flagFaults != "" {
		for _, k := range strings.Split(*flagFaults, ",") {
			if !slices.Contains(AllFaults, k) {
				t.Fatalf("-faults: unknown kind %q (kinds: %s)", k, strings.Join(AllFaults, ", "))
			}
			cfg.Faults = append(cfg.Faults, k)
		}
	}
	if cfg.Cycles == 0 {
		if v, err := strconv.Atoi(os.Getenv("CYCLES")); err == nil {
			cfg.Cycles = v
		}
	}
	if cfg.Seed == 0 {
		if v, err := strconv.ParseInt(os.Getenv("SEED"), 10, 64); err == nil {
			cfg.Seed = v
		}
	}
	if cfg.Cycles <= 0 {
		cfg.Cycles = len(AllFaults)
	}
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	return cfg
}

// runInner is the run itself, inside the clients' namespace.
func runInner(t *testing.T, prefix string) {
	net, err := netns.Open(prefix, Subnet, FirstAddr, HostNames())
	if err != nil {
		t.Fatal(err)
	}
	cfg := configFromFlags(t)
	cfg.BinDir = *flagBin
	cfg.Dir = *flagKeep
	keepAlways := cfg.Dir != ""
	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "cairn-nemesis-")
		if err != nil {
			t.Fatal(err)
		}
		cfg.Dir = d
	}
	cfg.Out = os.Stdout
	ctx, stop := signalContext()
	defer stop()
	rep, err := Run(ctx, net, cfg)
	if rep != nil {
		rep.Print(os.Stdout)
	}
	failed := err != nil || (rep != nil && !rep.OK())
	if failed {
		fmt.Printf("logs and evidence kept in %s\n", cfg.Dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Fatal("the nemesis found anomalies (see the report above)")
	}
	if !keepAlways {
		os.RemoveAll(cfg.Dir)
	}
}
