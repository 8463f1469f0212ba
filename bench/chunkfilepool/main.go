// Command chunkfilepool measures what the chunk file pool buys: 4 KiB random
// writes with an fdatasync after each, side by side in one run, into (a) a
// chunk from a freshly formatted pool, (b) a freshly fallocated file and (c)
// a sparse file of the same size. It prints the IOPS of each, the ratios as
// "pool/fallocated 1.85x" and "pool/sparse 2.40x" lines, and the bytes
// written per user byte, both as this process's /proc/self/io write_bytes
// (data only) and as the block device's sectors-written delta (data and
// filesystem journal).
//
// Run it with make bench-chunkfilepool, or:
//
//	go run ./bench/chunkfilepool -size 512MiB -duration 30s -dir /var/tmp
//
// Disk use is about three times -size while it runs; everything is removed at
// the end.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

func main() {
	var (
		dir      = flag.String("dir", os.TempDir(), "directory to create the work directory in (its filesystem is measured)")
		size     = flag.String("size", "512MiB", "data size of each file, e.g. 256MiB, 1GiB (disk use is about 3x)")
		duration = flag.Duration("duration", 30*time.Second, "measured time per file, split over the rounds")
		rounds   = flag.Int("rounds", 6, "rounds; each round writes to every file in turn")
		direct   = flag.Bool("direct", true, "open the files with O_DIRECT (as fio direct=1)")
		ioSize   = flag.Int("io-size", 4096, "bytes per write")
		seed     = flag.Uint64("seed", 1, "random seed for offsets")
		quiet    = flag.Bool("q", false, "no progress lines on stderr")
		idle     = flag.Duration("idle", 5*time.Second, "idle time before and after the run to sample other processes' device writes (0: none)")
	)
	flag.Parse()
	n, err := parseSize(*size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-chunkfilepool:", err)
		os.Exit(2)
	}
	if *rounds < 1 || *ioSize < 512 || *ioSize%512 != 0 || *duration <= 0 {
		fmt.Fprintln(os.Stderr, "bench-chunkfilepool: -rounds >= 1, -io-size a multiple of 512 and -duration > 0 please")
		os.Exit(2)
	}
	logf := func(format string, a ...any) {
		if !*quiet {
			fmt.Fprintf(os.Stderr, format+"\n", a...)
		}
	}
	cfg := Config{Dir: *dir, Size: n, IOSize: *ioSize, Duration: *duration, Rounds: *rounds, Direct: *direct, Seed: *seed}
	e, err := prepare(cfg, logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-chunkfilepool:", err)
		os.Exit(1)
	}
	err = e.run(logf, *idle)
	if err == nil {
		e.report(os.Stdout)
	}
	e.cleanup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-chunkfilepool:", err)
		os.Exit(1)
	}
}
