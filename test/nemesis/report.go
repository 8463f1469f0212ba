package nemesis

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// Report is what a run found.
type Report struct {
	Seed     int64
	Cycles   int // cycles asked for
	Done     int // cycles carried out
	Duration time.Duration

	Streams []StreamStats
	// Faults counts the faults injected per kind; Stalls is the longest
	// IO stall seen in a fault's window per kind and client stream.
	Faults map[string]int
	Stalls map[string]map[string]time.Duration

	Ops, Pruned   int
	NonLinear     []Key // keys whose history porcupine rejected
	CheckTimeouts int   // checks porcupine could not finish
	Lost          []Key // acknowledged writes lost
	Foreign       []Key // final values no write wrote
	Changed       []string
	Failures      []string // the cluster did not recover, or the run broke

	// Anomalies counts the generations with an anomaly per kind of the
	// fault of their last cycle.
	Anomalies map[string]int
	// Witnesses are short explanations of the first anomalies.
	Witnesses []string

	Procs         []ProcStats
	EvidenceDir   string
	evidenceSaved int
}

// StreamStats counts one client stream's operations.
type StreamStats struct {
	Name                                                       string
	Writes, WritesUnknown, Reads, ReadsFailed, Abandoned, Torn int64
}

// ProcStats is a daemon's peak RSS and its starts.
type ProcStats struct {
	Name              string
	PeakRSS           uint64
	Starts, Unplanned int
}

func newReport(cfg Config) *Report {
	return &Report{Seed: cfg.Seed, Cycles: cfg.Cycles, Faults: map[string]int{}, Anomalies: map[string]int{}, Stalls: map[string]map[string]time.Duration{}}
}

func (rep *Report) addFault(kind string, stalls map[string]time.Duration) {
	rep.Done++
	rep.Faults[kind]++
	if rep.Stalls[kind] == nil {
		rep.Stalls[kind] = map[string]time.Duration{}
	}
	for s, d := range stalls {
		rep.Stalls[kind][s] = max(rep.Stalls[kind][s], d)
	}
}

func (rep *Report) addVerdict(v Verdict, kind string) {
	if len(v.Bad) > 0 || len(v.Lost) > 0 || len(v.Foreign) > 0 {
		rep.Anomalies[kind]++
	}
	rep.Ops += v.Ops
	rep.Pruned += v.Pruned
	rep.NonLinear = append(rep.NonLinear, v.Bad...)
	rep.Lost = append(rep.Lost, v.Lost...)
	rep.Foreign = append(rep.Foreign, v.Foreign...)
	if v.Unknown {
		rep.CheckTimeouts++
	}
}

func (rep *Report) addStream(s *stream) {
	rep.Streams = append(rep.Streams, StreamStats{Name: s.name, Writes: s.writes.Load(),
		WritesUnknown: s.writesUnknown.Load(), Reads: s.reads.Load(), ReadsFailed: s.readsFailed.Load(),
		Abandoned: s.abandoned.Load(), Torn: s.torn.Load()})
}

func (rep *Report) collectProcs(c *Cluster) {
	rep.Procs = nil
	for _, p := range c.Procs() {
		starts, unplanned, _ := p.Counts()
		rep.Procs = append(rep.Procs, ProcStats{Name: p.Name, PeakRSS: p.PeakRSS(), Starts: starts, Unplanned: unplanned})
	}
}

// OK reports whether the run found nothing wrong: every history
// linearizable and checked, no acknowledged write lost, no foreign or
// changed value, and the cluster recovered from every fault.
func (rep *Report) OK() bool {
	return len(rep.NonLinear) == 0 && rep.CheckTimeouts == 0 && len(rep.Lost) == 0 &&
		len(rep.Foreign) == 0 && len(rep.Changed) == 0 && len(rep.Failures) == 0
}

// Print writes the report.
func (rep *Report) Print(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("==== nemesis report")
	p("seed %d; cycles %d of %d; %v", rep.Seed, rep.Done, rep.Cycles, rep.Duration.Round(time.Second))
	p("operations (acknowledged / unknown or failed):")
	for _, s := range rep.Streams {
		p("  %-4s writes %d / %d unknown; reads %d / %d failed; abandoned after %v: %d; torn reads %d",
			s.Name, s.Writes, s.WritesUnknown, s.Reads, s.ReadsFailed, opTimeout, s.Abandoned, s.Torn)
	}
	p("checked: %d operations (%d unknown writes never observed pruned)", rep.Ops, rep.Pruned)
	p("anomalies: non-linearizable keys %d%s; checker timeouts %d", len(rep.NonLinear), keyList(rep.NonLinear), rep.CheckTimeouts)
	p("acknowledged writes lost: %d%s", len(rep.Lost), keyList(rep.Lost))
	p("final values written by no operation: %d%s", len(rep.Foreign), keyList(rep.Foreign))
	p("checked blocks changed by later faults: %d", len(rep.Changed))
	for _, c := range rep.Changed {
		p("  %s", c)
	}
	p("faults injected, and the longest IO stall in a fault's window (lib = client library, nbd = through the gateway):")
	kinds := make([]string, 0, len(rep.Faults))
	for k := range rep.Faults {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		p("  %-24s %4d   stall lib %8v   nbd %8v   generations with anomalies %d", k, rep.Faults[k],
			rep.Stalls[k]["lib"].Round(time.Millisecond), rep.Stalls[k]["nbd"].Round(time.Millisecond), rep.Anomalies[k])
	}
	p("peak RSS (VmHWM) per process, starts, exits on its own:")
	for _, ps := range rep.Procs {
		p("  %-8s %6.1f MiB   starts %d   own exits %d", ps.Name, float64(ps.PeakRSS)/(1<<20), ps.Starts, ps.Unplanned)
	}
	for _, w := range rep.Witnesses {
		p("witness: %s", w)
	}
	for _, f := range rep.Failures {
		p("FAILURE: %s", f)
	}
	if rep.EvidenceDir != "" {
		p("evidence: %s", rep.EvidenceDir)
	}
	if rep.OK() {
		p("result: OK")
	} else {
		p("result: ANOMALIES FOUND")
	}
}

func keyList(ks []Key) string {
	if len(ks) == 0 {
		return ""
	}
	var s []string
	for i, k := range ks {
		if i == 8 {
			s = append(s, fmt.Sprintf("... (%d more)", len(ks)-8))
			break
		}
		s = append(s, k.String())
	}
	return " (" + strings.Join(s, ", ") + ")"
}
