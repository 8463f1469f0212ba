// Command cairn-playground runs a local Cairn cluster for trying it out: an
// MDS with embedded etcd, three chunkservers in three zones and the NBD and
// iSCSI gateway, each its own process on loopback, with all data under one
// directory (.playground by default, reused by the next start). It creates
// the volume vol0 (10 GiB) and prints how to reach it.
//
//	make playground                 # builds bin/ and runs bin/cairn-playground
//	cairn-playground --base-port 20000 --dir /tmp/pg
//	cairn-playground --clean        # remove the directory (asks first)
//
// Ctrl-C or SIGTERM stops everything: the gateway first, then the
// chunkservers, then the MDS.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"cairn.io/cairn/internal/daemon"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/tools/playground"
)

func main() {
	daemon.Main("cairn-playground", func(args []string) error { return run(args, os.Stdin, os.Stdout, os.Stderr) })
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("cairn-playground", flag.ContinueOnError)
	logFlags := daemon.AddLogFlags(fs)
	fs.SetOutput(stderr)
	var (
		dir          = fs.String("dir", playground.DefaultDir, "directory for data, logs and the state file (reused by the next start)")
		binDir       = fs.String("bin-dir", "", "directory of cairn-mds, cairn-chunkserver and cairn-gateway (default: this program's)")
		basePort     = fs.Int("base-port", 0, fmt.Sprintf("lay every port out from this one (base..base+%d) instead of the defaults (MDS 6700, NBD 10809, iSCSI 3260, ...)", playground.PortSpan-1))
		copysets     = fs.Uint("copysets-per-chunkserver", playground.DefaultCopysetsPerChunkServer, "copyset replicas per chunkserver in the logical pool (when it is created)")
		volume       = fs.String("volume", playground.DefaultVolume, "volume created if absent")
		stopTimeout  = fs.Duration("stop-timeout", playground.DefaultStopTimeout, "how long a process may take to stop after SIGTERM before SIGKILL")
		clean        = fs.Bool("clean", false, "remove the playground's directory (after confirming) and exit")
		yes          = fs.Bool("yes", false, "with --clean: do not ask")
		perZone      = fs.Int("chunkservers-per-zone", 1, fmt.Sprintf("chunkservers in each of the %d zones (1..%d; more than one lets recovery and balancing be tried)", playground.Zones, playground.MaxChunkServersPerZone))
		recoverAfter = fs.Duration("recover-after", playground.DefaultRecoverAfter, "how long the MDS waits for a lost chunkserver before rebuilding its replicas elsewhere")
		insecure     = fs.Bool("insecure", false, "run every process without TLS (by default the playground makes a CA in <dir>/tls and gives each process a certificate)")
		chunkSize    units.Bytes
		segmentSize  units.Bytes
		poolSize     = units.Bytes(playground.DefaultPoolSize)
		poolMax      = units.Bytes(playground.DefaultPoolMax)
		poolReserve  = units.Bytes(playground.DefaultPoolReserve)
		volumeSize   = units.Bytes(playground.DefaultVolumeSize)
	)
	fs.Var(&chunkSize, "chunk-size", "chunk size on the cluster's first start (default 16MiB)")
	fs.Var(&segmentSize, "segment-size", "segment size on the cluster's first start (default 1GiB)")
	fs.Var(&poolSize, "pool-size", "chunk file pool each chunkserver formats at its first start")
	fs.Var(&poolMax, "pool-max", "largest size a chunkserver's pool grows to on demand")
	fs.Var(&poolReserve, "pool-reserve", "disk space the pools always leave free")
	fs.Var(&volumeSize, "volume-size", "size of the volume when it is created")
	if err := daemon.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if *clean {
		return cleanDir(*dir, *yes, stdin, stdout)
	}
	logger, err := logFlags.Logger(stderr)
	if err != nil {
		return err
	}
	if *copysets == 0 || *copysets > 1000 {
		return fmt.Errorf("--copysets-per-chunkserver %d: want 1..1000", *copysets)
	}
	cfg := playground.Config{
		Dir: *dir, BinDir: *binDir,
		ChunkSize: uint64(chunkSize), SegmentSize: uint64(segmentSize),
		CopysetsPerChunkServer: uint32(*copysets),
		PoolSize:               uint64(poolSize), PoolMax: uint64(poolMax), PoolReserve: uint64(poolReserve),
		Volume: *volume, VolumeSize: uint64(volumeSize),
		StopTimeout:         *stopTimeout,
		Logger:              logger,
		LogFormat:           logFlags.Format(),
		LogLevel:            logFlags.Level(),
		ChunkServersPerZone: *perZone, RecoverAfter: *recoverAfter,
		Insecure: *insecure,
	}
	if *perZone < 1 || *perZone > playground.MaxChunkServersPerZone {
		return fmt.Errorf("--chunkservers-per-zone %d: want 1..%d", *perZone, playground.MaxChunkServersPerZone)
	}
	if *basePort != 0 {
		p, err := playground.PortsFrom(*basePort, playground.Zones**perZone)
		if err != nil {
			return fmt.Errorf("--base-port: %w", err)
		}
		cfg.Ports = &p
	}
	pg, err := playground.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := daemon.SignalContext()
	defer stop()
	start := time.Now()
	if err := pg.Start(ctx); err != nil {
		if ctx.Err() != nil {
			return errors.New("interrupted while starting")
		}
		return err
	}
	printBanner(stdout, pg.State(), time.Since(start), pg.BinDir())
	select {
	case <-ctx.Done():
	case <-pg.Failed():
	}
	stop() // a second Ctrl-C kills at once; the children then get SIGTERM from the kernel
	pg.Stop()
	return pg.Err()
}

// printBanner tells where everything is and how to use it.
func printBanner(w io.Writer, st playground.State, took time.Duration, binDir string) {
	rel := func(p string) string {
		if wd, err := os.Getwd(); err == nil {
			if r, err := filepath.Rel(wd, p); err == nil && !strings.HasPrefix(r, "..") {
				return r
			}
		}
		return p
	}
	var css []string
	for _, p := range st.Processes {
		if p.Zone != "" {
			css = append(css, fmt.Sprintf("%s %s (%s)", p.Name, p.Addr, p.Zone))
		}
	}
	gw := st.Process("gateway")
	v := st.Volume
	fmt.Fprintf(w, "\nCairn playground ready in %s\n\n", took.Round(100*time.Millisecond))
	fmt.Fprintf(w, "  MDS           %s\n", st.MDS)
	fmt.Fprintf(w, "  chunkservers  %s\n", strings.Join(css, ", "))
	fmt.Fprintf(w, "  gateway       NBD %s, iSCSI %s, metrics http://%s/metrics\n", st.NBD, st.ISCSI, gw.MetricsAddr)
	fmt.Fprintf(w, "\n  volume %s (%s)\n    %s\n    %s\n", v.Name, units.FormatBytes(v.Size), v.NBDURL, v.ISCSIURL)
	fmt.Fprintf(w, "\n  Try:\n")
	fmt.Fprintf(w, "    nbdinfo %s\n", v.NBDURL)
	if t := st.TLS; t != nil {
		fmt.Fprintf(w, "    nbdinfo '%s'   (NBD over TLS)\n", t.NBDSURL(v.NBDURL))
	}
	fmt.Fprintf(w, "    qemu-img convert -n -f raw -O raw disk.raw %s\n", v.NBDURL)
	fmt.Fprintf(w, "    nbdcopy %s backup.raw\n", v.NBDURL)
	fmt.Fprintf(w, "    fio --name=rw --ioengine=nbd --uri=%s --rw=randwrite --bs=4k --iodepth=32 --size=1g --runtime=30 --time_based\n", v.NBDURL)
	fmt.Fprintf(w, "    iscsi-ls -s iscsi://%s\n", st.ISCSI)
	fmt.Fprintf(w, "    iscsi-readcapacity16 %s\n", v.ISCSIURL)
	fmt.Fprintf(w, "    qemu-img bench -w -d 32 -c 100000 -s 4k -f raw %s\n", v.ISCSIURL)
	if ops := filepath.Join(binDir, "cairn-ops"); isExecutable(ops) {
		flags := "--insecure"
		if t := st.TLS; t != nil {
			flags = fmt.Sprintf("--tls-cert %s --tls-key %s --tls-ca %s", rel(t.OperatorCert), rel(t.OperatorKey), rel(t.CA))
		}
		fmt.Fprintf(w, "    %s --mds %s %s status\n", rel(ops), st.MDS, flags)
		fmt.Fprintf(w, "    %s --mds %s %s list volume\n", rel(ops), st.MDS, flags)
	}
	if t := st.TLS; t != nil {
		fmt.Fprintf(w, "\n  Every process speaks mutual TLS (CA %s). For cairn-ops in this shell:\n", rel(t.CA))
		fmt.Fprintf(w, "    export CAIRN_MDS=%s CAIRN_TLS_CERT=%s CAIRN_TLS_KEY=%s CAIRN_TLS_CA=%s\n",
			st.MDS, abs(t.OperatorCert), abs(t.OperatorKey), abs(t.CA))
	} else {
		fmt.Fprintf(w, "\n  Running without TLS. For cairn-ops in this shell:\n    export CAIRN_MDS=%s CAIRN_INSECURE=1\n", st.MDS)
	}
	fmt.Fprintf(w, "\n  Logs: %s/*.log   State: %s\n", rel(filepath.Join(st.Dir, "logs")), rel(filepath.Join(st.Dir, playground.StateFile)))
	fmt.Fprintf(w, "  Ctrl-C stops the playground; its data stays in %s for the next start (--clean removes it).\n\n", rel(st.Dir))
}

// cleanDir removes a playground directory after confirmation.
func cleanDir(dir string, yes bool, stdin io.Reader, stdout io.Writer) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	st, err := os.Stat(abs)
	if errors.Is(err, os.ErrNotExist) {
		fmt.Fprintf(stdout, "%s does not exist; nothing to remove\n", abs)
		return nil
	}
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", abs)
	}
	if _, err := os.Stat(filepath.Join(abs, "playground.lock")); err != nil {
		return fmt.Errorf("%s does not look like a playground directory (no playground.lock); not removing it", abs)
	}
	if running, pid, err := playground.Running(abs); err != nil {
		return err
	} else if running {
		return fmt.Errorf("a playground (pid %d) runs in %s: stop it first", pid, abs)
	}
	if !yes {
		fmt.Fprintf(stdout, "Remove %s (about %s)? [y/N] ", abs, units.FormatBytes(max(duBytes(abs)&^(1<<20-1), 1<<20)))
		line, _ := bufio.NewReader(stdin).ReadString('\n')
		if a := strings.ToLower(strings.TrimSpace(line)); a != "y" && a != "yes" {
			fmt.Fprintln(stdout, "not removed")
			return nil
		}
	}
	if err := os.RemoveAll(abs); err != nil {
		return fmt.Errorf("remove %s: %w", abs, err)
	}
	fmt.Fprintf(stdout, "removed %s\n", abs)
	return nil
}

// duBytes sums the disk usage of the files under dir.
func duBytes(dir string) uint64 {
	var n uint64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			if st, ok := info.Sys().(*syscall.Stat_t); ok {
				n += uint64(st.Blocks) * 512
			}
		}
		return nil
	})
	return n
}

func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

func abs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}
