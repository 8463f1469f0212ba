package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/internal/geometry"
)

// metaPage is the meta page in front of the data, as in a chunk file; every
// target file has the same layout and writes go to the data part only.
const metaPage = geometry.DefaultMetaPageSize

// Config describes one run.
type Config struct {
	// Dir is where the work directory is made (and removed afterwards).
	Dir string
	// Size is the data size of each file (the pool's chunk size for the run).
	Size int64
	// IOSize is the size of each write (4 KiB).
	IOSize int
	// Duration is the measured time per file, split over Rounds.
	Duration time.Duration
	Rounds   int
	// Direct opens the files with O_DIRECT, as fio's direct=1.
	Direct bool
	Seed   uint64
}

// target is one file under test and what was measured on it.
type target struct {
	name string
	path string
	f    *os.File

	ops        int64
	elapsed    time.Duration
	writeBytes int64 // /proc/self/io write_bytes delta
	devBytes   int64 // block device sectors written delta * 512
}

func (t *target) iops() float64 { return float64(t.ops) / t.elapsed.Seconds() }

// env is a prepared work directory with the three files.
type env struct {
	cfg     Config
	work    string
	targets []*target
	devStat string // /sys/dev/block/M:m/stat, "" when unknown
	devName string
	// Device writes of other processes, sampled while this one is idle.
	idleBytes int64
	idleTime  time.Duration
	fsName    string
	format    time.Duration
}

// prepare makes the work directory and the three files: a chunk from a
// freshly formatted pool, a fallocated file and a sparse file, all of
// metaPage+Size bytes and fsynced.
func prepare(cfg Config, logf func(string, ...any)) (*env, error) {
	if cfg.Size <= 0 || cfg.Size%int64(cfg.IOSize) != 0 {
		return nil, fmt.Errorf("size %d is not a positive multiple of the IO size %d", cfg.Size, cfg.IOSize)
	}
	work, err := os.MkdirTemp(cfg.Dir, "cairn-bench-chunkfilepool-")
	if err != nil {
		return nil, err
	}
	e := &env{cfg: cfg, work: work}
	e.devStat, e.devName = blockDevice(work)
	e.fsName = fsType(work)
	fail := func(err error) (*env, error) {
		e.cleanup()
		return nil, err
	}
	fileSize := metaPage + cfg.Size

	logf("formatting a pool chunk of %s", human(fileSize))
	start := time.Now()
	pool, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir:           filepath.Join(work, "pool"),
		ChunkSize:     cfg.Size,
		MetaPageSize:  metaPage,
		BlockSize:     geometry.DefaultBlockSize,
		InitialChunks: 1,
		MaxChunks:     1,
		GetTimeout:    30 * time.Minute,
	})
	if err != nil {
		return fail(err)
	}
	poolChunk := filepath.Join(work, "pool-chunk")
	err = pool.GetContext(context.Background(), poolChunk)
	e.format = time.Since(start)
	if cerr := pool.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fail(err)
	}

	falloc := filepath.Join(work, "fallocated")
	if err := makeFile(falloc, func(f *os.File) error {
		return unix.Fallocate(int(f.Fd()), 0, 0, fileSize)
	}); err != nil {
		return fail(fmt.Errorf("fallocate: %w", err))
	}
	sparse := filepath.Join(work, "sparse")
	if err := makeFile(sparse, func(f *os.File) error { return f.Truncate(fileSize) }); err != nil {
		return fail(fmt.Errorf("sparse file: %w", err))
	}
	if err := fsutil.SyncDir(work); err != nil {
		return fail(err)
	}
	flags := os.O_RDWR
	if cfg.Direct {
		flags |= unix.O_DIRECT
	}
	for _, t := range []struct{ name, path string }{{"pool", poolChunk}, {"fallocated", falloc}, {"sparse", sparse}} {
		f, err := os.OpenFile(t.path, flags, 0)
		if err != nil {
			return fail(err)
		}
		e.targets = append(e.targets, &target{name: t.name, path: t.path, f: f})
	}
	// Start from a quiet device: nothing of the preparation left to write.
	unix.Sync()
	return e, nil
}

func makeFile(path string, size func(*os.File) error) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := size(f); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

func (e *env) cleanup() {
	for _, t := range e.targets {
		_ = t.f.Close()
	}
	_ = os.RemoveAll(e.work)
}

// alignedBuf returns an IO buffer aligned for O_DIRECT (page-aligned memory
// from an anonymous mapping), filled with random bytes.
func alignedBuf(n int, rng *rand.Rand) ([]byte, error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, fmt.Errorf("mmap IO buffer: %w", err)
	}
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b, nil
}

// writeFor issues random IOSize writes into t's data, each followed by
// fdatasync, for d (or n writes when n > 0).
func (e *env) writeFor(t *target, buf []byte, rng *rand.Rand, d time.Duration, n int64) error {
	slots := e.cfg.Size / int64(e.cfg.IOSize)
	fd := int(t.f.Fd())
	wb0, _ := procWriteBytes()
	dev0, _ := readSectorsWritten(e.devStat)
	start := time.Now()
	var ops int64
	for {
		off := metaPage + rng.Int64N(slots)*int64(e.cfg.IOSize)
		if _, err := unix.Pwrite(fd, buf, off); err != nil {
			return fmt.Errorf("%s: pwrite: %w", t.name, err)
		}
		if err := unix.Fdatasync(fd); err != nil {
			return fmt.Errorf("%s: fdatasync: %w", t.name, err)
		}
		ops++
		if n > 0 {
			if ops >= n {
				break
			}
		} else if ops%16 == 0 && time.Since(start) >= d {
			break
		}
	}
	elapsed := time.Since(start)
	// The journal commit of the last fdatasync may reach the device a
	// moment later; the counters are read after the same call for every
	// file, so the bias is the same.
	wb1, _ := procWriteBytes()
	dev1, _ := readSectorsWritten(e.devStat)
	t.ops += ops
	t.elapsed += elapsed
	t.writeBytes += wb1 - wb0
	t.devBytes += (dev1 - dev0) * 512
	return nil
}

// sampleIdle measures the device's writes while this process writes
// nothing, to estimate what other processes add to the device counter.
func (e *env) sampleIdle(d time.Duration) {
	if e.devStat == "" || d <= 0 {
		return
	}
	a, err := readSectorsWritten(e.devStat)
	if err != nil {
		return
	}
	time.Sleep(d)
	b, err := readSectorsWritten(e.devStat)
	if err != nil {
		return
	}
	e.idleBytes += (b - a) * 512
	e.idleTime += d
}

// idleRate is the background device write rate in bytes per second.
func (e *env) idleRate() float64 {
	if e.idleTime <= 0 {
		return 0
	}
	return float64(e.idleBytes) / e.idleTime.Seconds()
}

// run measures every file in cfg.Rounds rounds, rotating the order each
// round so that no file always runs first. Before the first and after the
// last round it samples the device's background writes for idle.
func (e *env) run(logf func(string, ...any), idle time.Duration) error {
	e.sampleIdle(idle)
	defer e.sampleIdle(idle)
	rng := rand.New(rand.NewPCG(e.cfg.Seed, 0x5ca1ab1e))
	buf, err := alignedBuf(e.cfg.IOSize, rng)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	per := e.cfg.Duration / time.Duration(e.cfg.Rounds)
	for r := range e.cfg.Rounds {
		for i := range e.targets {
			t := e.targets[(i+r)%len(e.targets)]
			if err := e.writeFor(t, buf, rng, per, 0); err != nil {
				return err
			}
			logf("round %d/%d %-10s %8.0f IOPS so far", r+1, e.cfg.Rounds, t.name, t.iops())
		}
	}
	return nil
}

func (e *env) byName(name string) *target {
	for _, t := range e.targets {
		if t.name == name {
			return t
		}
	}
	return nil
}

// report prints the results table, the ratio lines and how the amplification
// figures were obtained.
func (e *env) report(w io.Writer) {
	cfg := e.cfg
	mode := "buffered"
	if cfg.Direct {
		mode = "O_DIRECT"
	}
	fmt.Fprintf(w, "%d KiB random writes, fdatasync after each, %s; files of %s data (+%d B meta page); %d rounds, %s per file\n",
		cfg.IOSize>>10, mode, human(cfg.Size), metaPage, cfg.Rounds, cfg.Duration)
	fmt.Fprintf(w, "work dir %s on %s, block device %s\n", e.work, e.fsName, orUnknown(e.devName))
	fmt.Fprintf(w, "pool chunk formatted (zeros written + fsync) in %s (%s/s)\n\n",
		e.format.Round(time.Millisecond), human(int64(float64(metaPage+cfg.Size)/e.format.Seconds())))
	fmt.Fprintf(w, "%-11s %9s %9s %10s %18s %19s %11s\n", "file", "writes", "IOPS", "mean lat", "write_bytes/byte", "device bytes/byte", "device net")
	for _, t := range e.targets {
		user := float64(t.ops) * float64(cfg.IOSize)
		dev, net := "n/a", "n/a"
		if e.devStat != "" {
			dev = fmt.Sprintf("%.2f", float64(t.devBytes)/user)
			if e.idleTime > 0 {
				net = fmt.Sprintf("%.2f", (float64(t.devBytes)-e.idleRate()*t.elapsed.Seconds())/user)
			}
		}
		fmt.Fprintf(w, "%-11s %9d %9.0f %10s %18.2f %19s %11s\n", t.name, t.ops, t.iops(),
			(t.elapsed / time.Duration(max(t.ops, 1))).Round(time.Microsecond), float64(t.writeBytes)/user, dev, net)
	}
	fmt.Fprintln(w)
	pool := e.byName("pool")
	for _, other := range []string{"fallocated", "sparse"} {
		fmt.Fprintf(w, "pool/%s %.2fx\n", other, pool.iops()/e.byName(other).iops())
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "write_bytes/byte: /proc/self/io write_bytes delta per user byte: what this process sent to the")
	fmt.Fprintln(w, "  block layer (its data writes only; the filesystem journal is written by jbd2 and not counted).")
	fmt.Fprintf(w, "device bytes/byte: %s sectors-written delta x 512 per user byte: everything the device\n", orUnknown(e.devStat))
	fmt.Fprintln(w, "  received during the run, journal included (the honest figure), and anything other processes")
	fmt.Fprintln(w, "  wrote to the same device meanwhile.")
	if e.idleTime > 0 {
		fmt.Fprintf(w, "device net: the same less other processes' writes, estimated at %s/s from %s of idle\n",
			human(int64(e.idleRate())), e.idleTime)
		fmt.Fprintln(w, "  sampling before and after the run (a rough correction on a shared disk).")
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "(unknown)"
	}
	return s
}

// procWriteBytes returns write_bytes from /proc/self/io.
func procWriteBytes() (int64, error) {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "write_bytes: "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, errors.New("no write_bytes in /proc/self/io")
}

// blockDevice returns the stat file and name of the block device holding
// path, or "" when it has none (tmpfs, overlay).
func blockDevice(path string) (statPath, name string) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", ""
	}
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))
	if _, err := os.Stat(sys + "/stat"); err != nil {
		return "", ""
	}
	if real, err := filepath.EvalSymlinks(sys); err == nil {
		name = filepath.Base(real)
	}
	return sys + "/stat", name
}

// readSectorsWritten returns the sectors-written field (the 7th) of a block
// device stat file.
func readSectorsWritten(statPath string) (int64, error) {
	if statPath == "" {
		return 0, errors.New("no block device")
	}
	b, err := os.ReadFile(statPath)
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 7 {
		return 0, fmt.Errorf("%s: %d fields", statPath, len(f))
	}
	return strconv.ParseInt(f[6], 10, 64)
}

func fsType(path string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "unknown filesystem"
	}
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlayfs"
	}
	return fmt.Sprintf("filesystem type %#x", st.Type)
}

// human formats a byte count with binary units.
func human(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.0f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// parseSize reads sizes such as 512MiB, 1GiB, 64M or a plain byte count.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}}
	for _, u := range units {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil || n <= 0 {
				return 0, fmt.Errorf("bad size %q", s)
			}
			return n * u.mult, nil
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n, nil
}
