// Command gateway measures a Cairn volume end to end through the gateway's
// frontends, with the real Debian clients: fio's nbd engine (libnbd) over
// NBD, and qemu-img bench and libiscsi's iscsi-perf over iSCSI. It prints
// one table of IOPS, MiB/s and p50/p99 latency.
//
// By default it starts a playground (bin/cairn-playground) in a temporary
// directory on free ports, with vol0 exactly as large as the fill, runs,
// stops it and removes the directory:
//
//	make bench          # NBD rows
//	make bench-iscsi    # iSCSI rows
//	go run ./bench/gateway -bin bin -nbd -iscsi -fill 1GiB -runtime 30s
//
// With -dir it measures the playground already running in that directory
// (its vol0 as it is; only the first -fill bytes are used by the NBD jobs).
//
// With -recovery it measures the schedulers instead (recovery.go): after
// the fill, a playground with two chunkservers per zone loses cs0's disk,
// and it reports the rate at which the lost replicas are rebuilt and the
// 4 KiB QD1 write latency before and during the rebuild.
//
// First the measured range is filled with 1 MiB sequential writes through
// NBD, so that reads hit written data. NBD jobs: 4 KiB
// random writes and reads at queue depth 1 and 32 and 1 MiB sequential
// writes at queue depth 8, each time-based for -runtime. Latency is fio's
// total latency (submission to completion). iSCSI: 4 KiB writes with
// qemu-img bench at depth 1 and 32 (sequential from offset 0, no flushes),
// 4 KiB random reads with iscsi-perf at 1 and 32 requests in flight; these
// tools report no latency percentiles.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/tools/playground"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-gateway:", err)
		os.Exit(1)
	}
}

// result is one row of the table.
type result struct {
	Frontend string  `json:"frontend"`
	Workload string  `json:"workload"`
	Command  string  `json:"command"`
	IOPS     float64 `json:"iops"`
	MiBps    float64 `json:"mib_per_s"`
	P50us    float64 `json:"p50_us,omitempty"`
	P99us    float64 `json:"p99_us,omitempty"`
	// CPUus is the CPU time of all Cairn processes per operation, and
	// CPU the seconds of each process during the job.
	CPUus float64            `json:"cpu_us_per_op,omitempty"`
	CPU   map[string]float64 `json:"cpu_seconds,omitempty"`
	// FsyncsPerWrite is the chunkservers' WAL fsyncs per write, divided by
	// the three replicas: the fsyncs each replica did per write.
	FsyncsPerWrite float64 `json:"fsyncs_per_write_per_replica,omitempty"`
	// Stages are the average microseconds of a write's stages on the
	// chunkservers (stageMetrics), for write jobs.
	Stages map[string]float64 `json:"write_stages_us,omitempty"`
}

func run() error {
	var (
		bin      = flag.String("bin", "bin", "directory of the Cairn binaries, for the playground this program starts")
		dir      = flag.String("dir", "", "measure the playground already running in this directory instead of starting one")
		doNBD    = flag.Bool("nbd", true, "run the NBD jobs (fio --ioengine=nbd)")
		doISCSI  = flag.Bool("iscsi", false, "run the iSCSI jobs (qemu-img bench, iscsi-perf)")
		runtime_ = flag.Duration("runtime", 30*time.Second, "measured time of each job")
		jsonOut  = flag.String("json", "", "also write the results to this JSON file")
		keep     = flag.Bool("keep", false, "keep the temporary playground directory")
		insecure = flag.Bool("insecure", false, "run the playground without TLS (to measure what TLS costs)")
		copysets = flag.Int("copysets", 0, "copyset replicas per chunkserver of the playground this program starts (0: the playground's default)")
		only     = flag.String("only", "", "run only the NBD jobs whose workload contains this text (e.g. 'write, QD32')")
		recovery = flag.Bool("recovery", false, "measure recovery instead: a playground with two chunkservers per zone loses a disk after the fill; the rebuild rate and the 4 KiB QD1 write latency before and during it")
		fill     units.Bytes
	)
	fill = 1 << 30
	flag.Var(&fill, "fill", "bytes written before the measurements, and the range the NBD jobs use (the playground's vol0 size)")
	flag.Parse()
	if fill < 1<<20 || fill%(1<<20) != 0 {
		return fmt.Errorf("-fill %s: want a whole number of MiB", fill.String())
	}
	if *runtime_ < time.Second {
		return fmt.Errorf("-runtime %s: want at least 1s", *runtime_)
	}
	need := []string{"fio"} // the fill runs through NBD in any case
	if *doISCSI {
		need = append(need, "qemu-img", "iscsi-perf")
	}
	for _, tool := range need {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not installed (Debian packages fio, qemu-utils + qemu-block-extra, libiscsi-bin)", tool)
		}
	}

	if *recovery {
		return measureRecovery(*bin, uint64(fill), *copysets, *runtime_, *keep)
	}
	var st *playground.State
	if *dir != "" {
		s, err := playground.ReadState(*dir)
		if err != nil {
			return err
		}
		if !s.Ready {
			return fmt.Errorf("the playground in %s is not ready", *dir)
		}
		st = s
	} else {
		var extra []string
		if *insecure {
			extra = append(extra, "--insecure")
		}
		pg, err := startPlayground(*bin, uint64(fill), *copysets, *keep, extra...)
		if err != nil {
			return err
		}
		defer pg.stop()
		st = pg.state
	}
	vol := st.Volume
	size := min(uint64(fill), vol.Size)
	fmt.Printf("Cairn gateway benchmark: %s (%s), %s filled, %s per job, %d CPUs\n",
		vol.Name, units.FormatBytes(vol.Size), units.FormatBytes(size), *runtime_, runtime.NumCPU())
	tlsNote := "mutual TLS between all processes"
	if st.TLS == nil {
		tlsNote = "no TLS"
	}
	fmt.Printf("playground %s, MDS %s, %s, load average before: %s\n\n", st.Dir, st.MDS, tlsNote, loadAverage())

	if vol.Size > size && *doISCSI {
		fmt.Printf("note: iscsi-perf reads at random over all %s of %s; only the first %s are written\n\n",
			units.FormatBytes(vol.Size), vol.Name, units.FormatBytes(size))
	}
	// The fill makes every measured read hit written data (unwritten
	// ranges read as zeros without reaching a chunkserver).
	logf("fill: writing %s sequentially through %s", units.FormatBytes(size), vol.NBDURL)
	if _, err := runFio(vol.NBDURL, size, *runtime_, fioJob{workload: "fill", rw: "write", bs: "1m", qd: 8}); err != nil {
		return err
	}
	var results []result
	if *doNBD {
		rs, err := nbdJobs(st, vol.NBDURL, size, *runtime_, *only)
		results = append(results, rs...)
		if err != nil {
			printTable(os.Stdout, results)
			return err
		}
	}
	if *doISCSI {
		rs, err := iscsiJobs(vol.ISCSIURL, vol.Size, *runtime_)
		results = append(results, rs...)
		if err != nil {
			printTable(os.Stdout, results)
			return err
		}
	}
	printTable(os.Stdout, results)
	fmt.Printf("load average after: %s\n", loadAverage())
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
}

// startedPlayground is a cairn-playground process this program started.
type startedPlayground struct {
	cmd    *exec.Cmd
	dir    string
	keep   bool
	state  *playground.State
	out    *bytes.Buffer
	exited chan error // receives the process's exit
}

// startPlayground runs cairn-playground in a temporary directory on free
// ports with vol0 of the fill size, and waits until it is ready.
func startPlayground(bin string, volSize uint64, copysets int, keep bool, extra ...string) (*startedPlayground, error) {
	exe, err := filepath.Abs(filepath.Join(bin, "cairn-playground"))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(exe); err != nil {
		return nil, fmt.Errorf("%s: %w (run make build)", exe, err)
	}
	dir, err := os.MkdirTemp("", "cairn-bench-")
	if err != nil {
		return nil, err
	}
	base, err := playground.FindFreeBase(os.Getpid())
	if err != nil {
		return nil, err
	}
	out := &bytes.Buffer{}
	args := []string{"--dir", dir, "--base-port", strconv.Itoa(base), "--volume-size", strconv.FormatUint(volSize, 10)}
	if copysets > 0 {
		args = append(args, "--copysets-per-chunkserver", strconv.Itoa(copysets))
	}
	args = append(args, extra...)
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	logf("starting a playground in %s (ports %d..%d)", dir, base, base+playground.PortSpan-1)
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	exited := make(chan error, 1)
	pg := &startedPlayground{cmd: cmd, dir: dir, keep: keep, out: out, exited: exited}
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(5 * time.Minute)
	for {
		if s, err := playground.ReadState(dir); err == nil && s.Ready {
			pg.state = s
			logf("playground ready")
			return pg, nil
		}
		select {
		case err := <-exited:
			os.RemoveAll(dir)
			return nil, fmt.Errorf("cairn-playground exited (%v):\n%s", err, out.String())
		case <-deadline:
			pg.stop()
			return nil, fmt.Errorf("playground not ready after 5 minutes:\n%s", out.String())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// stop stops the playground with SIGTERM (it stops its children in order)
// and removes its directory.
func (pg *startedPlayground) stop() {
	_ = pg.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-pg.exited:
	case <-time.After(time.Minute):
		_ = pg.cmd.Process.Kill()
		<-pg.exited
	}
	if pg.keep {
		logf("playground stopped; kept %s", pg.dir)
		return
	}
	os.RemoveAll(pg.dir)
	logf("playground stopped and removed")
}

// fioJob is one fio run.
type fioJob struct {
	workload string
	rw       string
	bs       string
	qd       int
	timed    bool
}

func nbdJobs(st *playground.State, url string, size uint64, rt time.Duration, only string) ([]result, error) {
	jobs := []fioJob{
		{"4 KiB random write, QD1", "randwrite", "4k", 1, true},
		{"4 KiB random write, QD32", "randwrite", "4k", 32, true},
		{"4 KiB random read, QD1", "randread", "4k", 1, true},
		{"4 KiB random read, QD32", "randread", "4k", 32, true},
		{"1 MiB sequential write, QD8", "write", "1m", 8, true},
	}
	var out []result
	for _, j := range jobs {
		if !strings.Contains(j.workload, only) {
			continue
		}
		logf("nbd: %s for %s", j.workload, rt)
		before := sampleUsage(st)
		r, err := runFio(url, size, rt, j)
		if err != nil {
			return out, err
		}
		u := sampleUsage(st).since(before)
		// fio's rate leaves out its 2 s ramp; the samples include it.
		if ops := r.IOPS * (rt + 2*time.Second).Seconds(); ops > 0 {
			r.CPUus = float64(u.total().Microseconds()) / ops
			if strings.Contains(j.rw, "write") {
				r.FsyncsPerWrite = u.walFsyncs / 3 / ops
				r.Stages = map[string]float64{}
				for label, s := range u.stages {
					r.Stages[label] = s.avgMicros()
				}
			}
		}
		r.CPU = map[string]float64{}
		for name, c := range u.cpu {
			r.CPU[name] = c.Seconds()
		}
		out = append(out, r)
	}
	return out, nil
}

// fioOutput is the part of fio's JSON output the table needs.
type fioOutput struct {
	Jobs []struct {
		Error int `json:"error"`
		Read  struct {
			IOPS    float64 `json:"iops"`
			BWBytes float64 `json:"bw_bytes"`
			LatNs   struct {
				Percentile map[string]float64 `json:"percentile"`
			} `json:"lat_ns"`
		} `json:"read"`
		Write struct {
			IOPS    float64 `json:"iops"`
			BWBytes float64 `json:"bw_bytes"`
			LatNs   struct {
				Percentile map[string]float64 `json:"percentile"`
			} `json:"lat_ns"`
		} `json:"write"`
	} `json:"jobs"`
}

func runFio(url string, size uint64, rt time.Duration, j fioJob) (result, error) {
	args := []string{"--name=cairn", "--ioengine=nbd", "--uri=" + url, "--rw=" + j.rw, "--bs=" + j.bs,
		"--iodepth=" + strconv.Itoa(j.qd), "--size=" + strconv.FormatUint(size, 10),
		"--lat_percentiles=1", "--clat_percentiles=0", "--percentile_list=50:99",
		"--randrepeat=0", "--norandommap", "--output-format=json"}
	if j.timed {
		args = append(args, "--time_based", fmt.Sprintf("--runtime=%ds", int(rt.Seconds())), "--ramp_time=2s")
	}
	cmdline := "fio " + strings.Join(args, " ")
	ctx, cancel := context.WithTimeout(context.Background(), rt+30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "fio", args...)
	cmd.Dir = os.TempDir()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return result{}, fmt.Errorf("%s: %w\n%s%s", cmdline, err, stderr.String(), stdout.String())
	}
	var out fioOutput
	// fio may print notes before the JSON document.
	b := stdout.Bytes()
	if i := bytes.IndexByte(b, '{'); i > 0 {
		b = b[i:]
	}
	if err := json.Unmarshal(b, &out); err != nil || len(out.Jobs) != 1 {
		return result{}, fmt.Errorf("%s: unreadable output (%v):\n%s", cmdline, err, stdout.String())
	}
	job := out.Jobs[0]
	if job.Error != 0 {
		return result{}, fmt.Errorf("%s: fio reports error %d:\n%s", cmdline, job.Error, stderr.String())
	}
	side := job.Write
	if strings.Contains(j.rw, "read") {
		side = job.Read
	}
	return result{
		Frontend: "nbd", Workload: j.workload, Command: cmdline,
		IOPS: side.IOPS, MiBps: side.BWBytes / (1 << 20),
		P50us: side.LatNs.Percentile["50.000000"] / 1e3, P99us: side.LatNs.Percentile["99.000000"] / 1e3,
	}, nil
}

var (
	qemuBenchRe = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)
	perfIOPSRe  = regexp.MustCompile(`iops average (\d+)`)
)

func iscsiJobs(url string, volSize uint64, rt time.Duration) ([]result, error) {
	var out []result
	for _, qd := range []int{1, 32} {
		logf("iscsi: qemu-img bench 4 KiB writes at depth %d for about %s", qd, rt)
		r, err := qemuImgBench(url, volSize, qd, rt)
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	for _, qd := range []int{1, 32} {
		logf("iscsi: iscsi-perf 4 KiB random reads at %d in flight for %s", qd, rt)
		r, err := iscsiPerf(url, qd, rt)
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
	return out, nil
}

// qemuImgBench runs qemu-img bench for about rt: a short calibration run
// sizes the request count.
func qemuImgBench(url string, volSize uint64, qd int, rt time.Duration) (result, error) {
	runOnce := func(count int) (float64, string, error) {
		args := []string{"bench", "-w", "-d", strconv.Itoa(qd), "-c", strconv.Itoa(count), "-s", "4k", "-f", "raw", url}
		cmdline := "qemu-img " + strings.Join(args, " ")
		ctx, cancel := context.WithTimeout(context.Background(), 4*rt+5*time.Minute)
		defer cancel()
		b, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput()
		if err != nil {
			return 0, cmdline, fmt.Errorf("%s: %w\n%s", cmdline, err, b)
		}
		m := qemuBenchRe.FindSubmatch(b)
		if m == nil {
			return 0, cmdline, fmt.Errorf("%s: no completion time in:\n%s", cmdline, b)
		}
		secs, _ := strconv.ParseFloat(string(m[1]), 64)
		return secs, cmdline, nil
	}
	probe := 300 * qd
	secs, cmdline, err := runOnce(probe)
	if err != nil {
		return result{}, err
	}
	count := probe
	if secs < rt.Seconds()/2 {
		count = int(math.Round(float64(probe) / math.Max(secs, 1e-3) * rt.Seconds()))
		count = min(count, int(volSize/4096)) // one pass over the volume at most
		if secs, cmdline, err = runOnce(count); err != nil {
			return result{}, err
		}
	}
	iops := float64(count) / secs
	return result{Frontend: "iscsi", Workload: fmt.Sprintf("4 KiB sequential write, QD%d", qd), Command: cmdline,
		IOPS: iops, MiBps: iops * 4096 / (1 << 20)}, nil
}

func iscsiPerf(url string, qd int, rt time.Duration) (result, error) {
	args := []string{"-t", strconv.Itoa(int(rt.Seconds())), "-m", strconv.Itoa(qd), "-r", url}
	cmdline := "iscsi-perf " + strings.Join(args, " ")
	ctx, cancel := context.WithTimeout(context.Background(), rt+2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "iscsi-perf", args...)
	cmd.Dir = os.TempDir()
	b, err := cmd.CombinedOutput()
	if err != nil {
		return result{}, fmt.Errorf("%s: %w\n%s", cmdline, err, b)
	}
	m := perfIOPSRe.FindAllSubmatch(b, -1)
	if m == nil || !bytes.Contains(b, []byte("finished")) {
		return result{}, fmt.Errorf("%s did not finish:\n%s", cmdline, b)
	}
	iops, _ := strconv.ParseFloat(string(m[len(m)-1][1]), 64)
	return result{Frontend: "iscsi", Workload: fmt.Sprintf("4 KiB random read, QD%d", qd), Command: cmdline,
		IOPS: iops, MiBps: iops * 4096 / (1 << 20)}, nil
}

func printTable(w io.Writer, rs []result) {
	if len(rs) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "frontend\tworkload\ttool\tIOPS\tMiB/s\tp50\tp99\tCPU/op\tfsyncs/write\t")
	for _, r := range rs {
		tool := strings.Fields(r.Command)[0]
		if tool == "qemu-img" {
			tool = "qemu-img bench"
		}
		cpu, fs := "-", "-"
		if r.CPUus > 0 {
			cpu = lat(r.CPUus)
		}
		if r.FsyncsPerWrite > 0 {
			fs = fmt.Sprintf("%.2f", r.FsyncsPerWrite)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.0f\t%.1f\t%s\t%s\t%s\t%s\t\n", r.Frontend, r.Workload, tool, r.IOPS, r.MiBps, lat(r.P50us), lat(r.P99us), cpu, fs)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nCPU/op: CPU time of every Cairn process per operation; fsyncs/write: WAL fdatasyncs per write per replica.")
	fmt.Fprintln(w, "CPU seconds per process and job:")
	for _, r := range rs {
		if len(r.CPU) == 0 {
			continue
		}
		names := make([]string, 0, len(r.CPU))
		for n := range r.CPU {
			names = append(names, n)
		}
		sort.Strings(names)
		parts := make([]string, 0, len(names))
		for _, n := range names {
			parts = append(parts, fmt.Sprintf("%s %.1f", n, r.CPU[n]))
		}
		fmt.Fprintf(w, "  %s %s: %s\n", r.Frontend, r.Workload, strings.Join(parts, ", "))
	}
	stages := false
	for _, r := range rs {
		if len(r.Stages) == 0 {
			continue
		}
		if !stages {
			fmt.Fprintln(w, "\nWrite stages on the chunkservers (averages): commit = proposal to commit on the leader, apply = commit to applied:")
			stages = true
		}
		parts := make([]string, 0, len(stageMetrics))
		for _, m := range stageMetrics {
			parts = append(parts, fmt.Sprintf("%s %s", m.label, lat(r.Stages[m.label])))
		}
		fmt.Fprintf(w, "  %s %s: %s\n", r.Frontend, r.Workload, strings.Join(parts, ", "))
	}
	fmt.Fprintln(w, "\ncommands:")
	for _, r := range rs {
		fmt.Fprintf(w, "  %s\n", r.Command)
	}
}

func lat(us float64) string {
	switch {
	case us == 0:
		return "-"
	case us < 1000:
		return fmt.Sprintf("%.0fµs", us)
	default:
		return fmt.Sprintf("%.2fms", us/1000)
	}
}

// loadAverage is the first three fields of /proc/loadavg: on a shared
// machine, what else was running.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
