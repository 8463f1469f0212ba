package main

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"cairn.io/cairn/tools/playground"
)

// clockTicks is the kernel's USER_HZ, the unit of /proc/<pid>/stat's CPU
// times (100 on every Linux architecture Cairn runs on).
const clockTicks = 100

// usage is what the cluster's processes spent during one job: CPU per
// process, the chunkservers' WAL fsyncs and the sums of their write stages.
type usage struct {
	cpu       map[string]time.Duration // by process name
	walFsyncs float64                  // summed over the chunkservers
	stages    map[string]stageSum      // by stageMetrics label, summed over the chunkservers
}

// stageMetrics are the chunkservers' latency histograms whose averages a
// write job reports: where a write's time on its leader goes.
var stageMetrics = []struct{ label, name string }{
	{"commit", "cairn_chunkserver_proposal_commit_duration_seconds"},
	{"apply", "cairn_chunkserver_proposal_apply_duration_seconds"},
	{"WAL fdatasync", "cairn_chunkserver_wal_fsync_duration_seconds"},
}

// stageSum is a histogram's sum (seconds) and count.
type stageSum struct{ sum, count float64 }

// avgMicros is the average in microseconds, 0 without observations.
func (s stageSum) avgMicros() float64 {
	if s.count <= 0 {
		return 0
	}
	return s.sum / s.count * 1e6
}

// sampleUsage reads the CPU time of every playground process and the WAL
// fsync count of every chunkserver; a process it cannot read counts zero.
func sampleUsage(st *playground.State) usage {
	u := usage{cpu: map[string]time.Duration{}, stages: map[string]stageSum{}}
	for _, p := range st.Processes {
		if p.PID != 0 {
			u.cpu[p.Name] = cpuTime(p.PID)
		}
		if strings.HasPrefix(p.Name, "cs") && p.MetricsAddr != "" {
			u.walFsyncs += metricValue(p.MetricsAddr, "cairn_chunkserver_wal_fsync_duration_seconds_count")
			for _, m := range stageMetrics {
				s := u.stages[m.label]
				s.sum += metricValue(p.MetricsAddr, m.name+"_sum")
				s.count += metricValue(p.MetricsAddr, m.name+"_count")
				u.stages[m.label] = s
			}
		}
	}
	return u
}

// since is the usage between an earlier sample and u.
func (u usage) since(before usage) usage {
	d := usage{cpu: map[string]time.Duration{}, walFsyncs: u.walFsyncs - before.walFsyncs, stages: map[string]stageSum{}}
	for name, t := range u.cpu {
		d.cpu[name] = t - before.cpu[name]
	}
	for label, s := range u.stages {
		b := before.stages[label]
		d.stages[label] = stageSum{sum: s.sum - b.sum, count: s.count - b.count}
	}
	return d
}

// total is the CPU time of every process.
func (u usage) total() time.Duration {
	var t time.Duration
	for _, c := range u.cpu {
		t += c
	}
	return t
}

// cpuTime is a process's user plus system CPU time from /proc/<pid>/stat.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name may hold spaces: fields start after its ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	// utime and stime are fields 14 and 15 of the line, 12 and 13 here.
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	stt, _ := strconv.ParseUint(f[12], 10, 64)
	return time.Duration(ut+stt) * time.Second / clockTicks
}

// metricValue reads one sample of a Prometheus text exposition; 0 when
// absent or unreachable.
func metricValue(addr, name string) float64 {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, _ := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v
		}
	}
	return 0
}
