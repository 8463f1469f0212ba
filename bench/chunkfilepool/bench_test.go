package main

import (
	"bytes"
	"flag"
	"math/rand/v2"
	"os"
	"regexp"
	"sync"
	"testing"
	"time"
)

var (
	benchSize = flag.String("cfp.size", "256MiB", "data size of each benchmark file (disk use is about 3x)")
	benchDir  = flag.String("cfp.dir", os.TempDir(), "directory for the benchmark files")
)

// TestRunnerReportsAllFigures runs the whole benchmark on small files for a
// few writes each and checks that every figure is measured and printed.
func TestRunnerReportsAllFigures(t *testing.T) {
	cfg := Config{Dir: t.TempDir(), Size: 4 << 20, IOSize: 4096, Duration: time.Second, Rounds: 1, Direct: true, Seed: 7}
	e, err := prepare(cfg, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer e.cleanup()
	for _, tg := range e.targets {
		fi, err := tg.f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() != metaPage+cfg.Size {
			t.Fatalf("%s is %d bytes", tg.name, fi.Size())
		}
	}
	rng := rand.New(rand.NewPCG(1, 1))
	buf, err := alignedBuf(cfg.IOSize, rng)
	if err != nil {
		t.Fatal(err)
	}
	for _, tg := range e.targets {
		if err := e.writeFor(tg, buf, rng, 0, 20); err != nil {
			t.Fatal(err)
		}
		if tg.ops != 20 || tg.elapsed <= 0 {
			t.Fatalf("%s: %d ops in %s", tg.name, tg.ops, tg.elapsed)
		}
	}
	if e.devStat != "" && e.byName("pool").devBytes <= 0 {
		t.Fatal("device counter did not move while writing")
	}
	var out bytes.Buffer
	e.report(&out)
	for _, re := range []string{
		`(?m)^pool/fallocated \d+\.\d\dx$`,
		`(?m)^pool/sparse \d+\.\d\dx$`,
		`(?m)^pool\s+20\s+\d+`,
		`(?m)^fallocated\s+20\s+\d+`,
		`(?m)^sparse\s+20\s+\d+`,
	} {
		if !regexp.MustCompile(re).Match(out.Bytes()) {
			t.Fatalf("report lacks %s:\n%s", re, out.String())
		}
	}
	work := e.work
	e.cleanup()
	if _, err := os.Stat(work); !os.IsNotExist(err) {
		t.Fatalf("work dir left behind: %v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512MiB": 512 << 20, "1GiB": 1 << 30, "64M": 64 << 20, "4096": 4096, "8KiB": 8192} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Fatalf("parseSize(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "x", "-1MiB", "0"} {
		if _, err := parseSize(in); err == nil {
			t.Fatalf("parseSize(%q) accepted", in)
		}
	}
}

var (
	benchOnce sync.Once
	benchEnv  *env
	benchErr  error
)

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if benchEnv != nil {
		benchEnv.cleanup()
	}
	os.Exit(code)
}

// BenchmarkRandomWrite4KFdatasync is the Go benchmark form of the
// comparison: one sub-benchmark per file, b.N synced 4 KiB writes each.
// Files are prepared once (size set with -cfp.size) and removed at the end.
//
//	go test -run XXX -bench RandomWrite4K -benchtime 20000x ./bench/chunkfilepool
func BenchmarkRandomWrite4KFdatasync(b *testing.B) {
	benchOnce.Do(func() {
		size, err := parseSize(*benchSize)
		if err != nil {
			benchErr = err
			return
		}
		benchEnv, benchErr = prepare(Config{Dir: *benchDir, Size: size, IOSize: 4096, Rounds: 1, Direct: true, Seed: 1}, b.Logf)
	})
	if benchErr != nil {
		b.Fatal(benchErr)
	}
	rng := rand.New(rand.NewPCG(2, 3))
	buf, err := alignedBuf(4096, rng)
	if err != nil {
		b.Fatal(err)
	}
	for _, name := range []string{"pool", "fallocated", "sparse"} {
		b.Run(name, func(b *testing.B) {
			t := benchEnv.byName(name)
			before := *t
			b.SetBytes(4096)
			b.ResetTimer()
			if err := benchEnv.writeFor(t, buf, rng, 0, int64(b.N)); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			ops := float64(t.ops - before.ops)
			b.ReportMetric(ops/(t.elapsed-before.elapsed).Seconds(), "IOPS")
			b.ReportMetric(float64(t.writeBytes-before.writeBytes)/(ops*4096), "write_bytes/B")
			if benchEnv.devStat != "" {
				b.ReportMetric(float64(t.devBytes-before.devBytes)/(ops*4096), "dev_bytes/B")
			}
		})
	}
}
