package nemesis

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"cairn.io/cairn/internal/poll"
	"cairn.io/cairn/test/nemesis/netns"
)

// Config configures a run.
type Config struct {
	// Cycles is the number of faults injected, one per cycle.
	Cycles int
	// Seed draws the faults, their targets and durations, and the
	// workload's operations.
	Seed int64
	// Dir holds the daemons' data and logs and, on an anomaly, the
	// evidence.
	Dir string
	// BinDir holds the daemons' binaries.
	BinDir string
	// Faults are the kinds drawn from (default AllFaults).
	Faults []string
	// Workers per client stream (default 4).
	Workers int
	// Out receives the log of the run.
	Out io.Writer
}

// runner is one run in progress.
type runner struct {
	cfg     Config
	c       *Cluster
	h       *History
	streams []*stream
	rep     *Report
	out     io.Writer
	mu      sync.Mutex // serialises log lines
	// finals keeps every checked key's final value, and the values of its
	// unknown writes (which may still land), for the durability check at
	// the end.
	finals map[Key]finalState
}

type finalState struct {
	value uint64
	late  map[uint64]bool
}

func (r *runner) logf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintf(r.out, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// Run starts the cluster on net, runs the workload and the cycles of
// faults, checks the histories and returns the report. An error means the
// run could not be carried out (or the cluster did not recover from a
// fault); anomalies are in the report.
func Run(ctx context.Context, net *netns.Net, cfg Config) (rep *Report, err error) {
	if cfg.Workers <= 0 {
		cfg.Workers = 4
	}
	if len(cfg.Faults) == 0 {
		cfg.Faults = AllFaults
	}
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	r := &runner{cfg: cfg, out: cfg.Out, h: NewHistory(), finals: map[Key]finalState{},
		rep: newReport(cfg)}
	started := time.Now()
	defer func() { r.rep.Duration = time.Since(started) }()
	r.logf("nemesis: seed %d, %d cycles of %s, run directory %s", cfg.Seed, cfg.Cycles, strings.Join(cfg.Faults, ","), cfg.Dir)
	c, err := NewCluster(cfg.Dir, cfg.BinDir, net, r.logf)
	if err != nil {
		return r.rep, err
	}
	r.c = c
	defer func() {
		if herr := net.HealAll(); herr != nil {
			r.logf("heal the network: %v", herr)
		}
		for _, p := range c.Procs() {
			p.SampleRSS()
		}
		r.rep.collectProcs(c)
		for _, s := range r.streams {
			r.rep.addStream(s)
		}
		if serr := c.Stop(); serr != nil {
			r.logf("stop the cluster: %v", serr)
			if err == nil {
				err = serr
			}
		}
	}()
	sctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	err = c.Start(sctx)
	cancel()
	if err != nil {
		return r.rep, fmt.Errorf("start the cluster: %w", err)
	}
	r.logf("cluster up: MDS %s, chunkservers %d, NBD %s", c.MDSAddr(), len(c.CS), c.NBDAddr())

	wctx, stopWork := context.WithCancel(ctx)
	var wg sync.WaitGroup
	r.streams = []*stream{libStream(r.h, c.MDSAddr(), cfg.Workers), nbdStream(r.h, c.NBDAddr(), cfg.Workers)}
	for i, s := range r.streams {
		s.run(wctx, uint64(cfg.Seed)+uint64(i)<<32, i*100, &wg)
	}
	stopped := false
	stopWorkload := func() {
		if !stopped {
			stopped = true
			stopWork()
			wg.Wait()
		}
	}
	defer stopWorkload()
	if err := r.warmUp(ctx); err != nil {
		return r.rep, err
	}

	rng := rand.New(rand.NewPCG(uint64(cfg.Seed), 0x6e656d65736973))
	gensEvery := (cfg.Cycles + MaxGens - 2) / (MaxGens - 1)
	gen := 0
	var order []string
	for cycle := 1; cycle <= cfg.Cycles; cycle++ {
		if ctx.Err() != nil {
			return r.rep, ctx.Err()
		}
		// Each round draws every kind once, in a seeded order.
		if len(order) == 0 {
			order = append([]string(nil), cfg.Faults...)
			rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		}
		kind := order[0]
		order = order[1:]
		if err := r.cycle(ctx, cycle, kind, rng); err != nil {
			r.rep.Failures = append(r.rep.Failures, fmt.Sprintf("cycle %d (%s): %v", cycle, kind, err))
			r.saveEvidence(fmt.Sprintf("cycle-%d", cycle), nil)
			return r.rep, err
		}
		if cycle%gensEvery == 0 || cycle == cfg.Cycles {
			if cycle == cfg.Cycles {
				stopWorkload()
			}
			if err := r.checkGen(ctx, gen, kind, cycle < cfg.Cycles); err != nil {
				return r.rep, err
			}
			gen++
		}
	}
	stopWorkload()
	if err := r.recheckAll(ctx); err != nil {
		return r.rep, err
	}
	return r.rep, nil
}

// warmUp waits until both streams complete operations.
func (r *runner) warmUp(ctx context.Context) error {
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for _, s := range r.streams {
		err := poll.Until(wctx, s.name+" operations to complete", func() error {
			if s.writes.Load() < 10 || s.reads.Load() < 10 {
				msg := ""
				if p := s.lastErr.Load(); p != nil {
					msg = *p
				}
				return fmt.Errorf("%d writes, %d reads so far (last error: %s)", s.writes.Load(), s.reads.Load(), msg)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	r.logf("workload running: lib %d ops, nbd %d ops", r.streams[0].writes.Load()+r.streams[0].reads.Load(),
		r.streams[1].writes.Load()+r.streams[1].reads.Load())
	return nil
}

// cycle injects one fault and waits until the cluster has recovered.
func (r *runner) cycle(ctx context.Context, n int, kind string, rng *rand.Rand) error {
	f, err := r.newFault(kind, rng)
	if err != nil {
		return err
	}
	r.logf("cycle %d/%d: %s on %s: set up (hold %v)", n, r.cfg.Cycles, kind, f.target, f.hold.Round(time.Millisecond))
	start := r.h.Now()
	if err := f.inject(ctx); err != nil {
		return fmt.Errorf("inject: %w", err)
	}
	r.logf("cycle %d: injected", n)
	if f.effect != nil {
		ectx, cancel := context.WithTimeout(ctx, effectTimeout)
		err := f.effect(ectx)
		cancel()
		if err != nil {
			return fmt.Errorf("wait for the effect: %w", err)
		}
		r.logf("cycle %d: in effect %s", n, f.note)
	}
	sleepCtx(ctx, f.hold)
	hctx, cancel := context.WithTimeout(ctx, healTimeout)
	err = f.heal(hctx)
	cancel()
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	healed := r.h.Now()
	r.logf("cycle %d: recovered after %v; waiting for a healthy cluster", n, time.Duration(healed-start).Round(time.Millisecond))
	rctx, cancel := context.WithTimeout(ctx, recoverTimeout)
	err = r.c.Healthy(rctx)
	cancel()
	if err != nil {
		return fmt.Errorf("the cluster did not recover within %v: %w", recoverTimeout, err)
	}
	if f.cleanup != nil {
		if err := f.cleanup(ctx); err != nil {
			return fmt.Errorf("clean up: %w", err)
		}
	}
	// The window ends once every stream has completed IO again (bounded)
	// and then had a moment on the healthy cluster.
	healthy := r.h.Now()
	ioctx, cancel := context.WithTimeout(ctx, 2*opTimeout)
	for _, s := range r.streams {
		if err := poll.Until(ioctx, s.name+" IO to complete again", func() error { return s.completedSince(healthy) }); err != nil {
			r.logf("cycle %d: %v", n, err)
		}
	}
	cancel()
	sleepCtx(ctx, time.Second)
	end := r.h.Now()
	stalls := map[string]time.Duration{}
	for _, s := range r.streams {
		stalls[s.name] = s.stall(start, end)
	}
	r.rep.addFault(kind, stalls)
	r.logf("cycle %d: healthy %v after injection; longest stall lib %v, nbd %v%s", n,
		time.Duration(end-start).Round(time.Millisecond), stalls["lib"].Round(time.Millisecond),
		stalls["nbd"].Round(time.Millisecond), noteSuffix(f.note))
	for _, p := range r.c.Procs() {
		p.SampleRSS()
	}
	return nil
}

func noteSuffix(s string) string {
	if s == "" {
		return ""
	}
	return "; " + s
}

// checkGen moves the workload to the next generation, reads the old one's
// blocks and checks their histories.
func (r *runner) checkGen(ctx context.Context, gen int, kind string, next bool) error {
	keys := map[Key]bool{}
	var perVol [][]Key
	for _, s := range r.streams {
		ks := genKeys(s.vol, gen)
		perVol = append(perVol, ks)
		for _, k := range ks {
			keys[k] = true
		}
		if next {
			sctx, cancel := context.WithTimeout(ctx, 2*opTimeout)
			err := s.switchGen(sctx, int64(gen+1))
			cancel()
			if err != nil {
				return err
			}
		}
	}
	final := map[Key]uint64{}
	for i, ks := range perVol {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		vals, err := readFinal(rctx, r.h, r.c.MDSAddr(), r.streams[i].vol, ks, 1000+i)
		cancel()
		if err != nil {
			return fmt.Errorf("final reads of generation %d: %w", gen, err)
		}
		for k, v := range vals {
			final[k] = v
		}
	}
	ops := r.h.Take(keys)
	v := Check(ops, final, 5*time.Minute)
	r.rep.addVerdict(v, kind)
	for k, val := range final {
		fs := finalState{value: val, late: map[uint64]bool{}}
		for _, op := range ops {
			if op.Key == k && op.Write && op.Return == Infinity {
				fs.late[op.Value] = true
			}
		}
		r.finals[k] = fs
	}
	r.logf("generation %d checked: %d operations (%d unobserved unknown writes pruned), non-linearizable keys %d, lost %d, foreign %d%s",
		gen, v.Ops, v.Pruned, len(v.Bad), len(v.Lost), len(v.Foreign), map[bool]string{true: ", CHECK TIMED OUT", false: ""}[v.Unknown])
	// A run goes on after an anomaly (the report counts them per fault
	// kind); the evidence of the first few is kept.
	if (len(v.Bad) > 0 || len(v.Lost) > 0 || len(v.Foreign) > 0) && r.rep.evidenceSaved < maxEvidence {
		r.rep.evidenceSaved++
		r.saveEvidence(fmt.Sprintf("gen-%d", gen), &v)
		r.saveOps(fmt.Sprintf("gen-%d", gen), ops, v)
		for _, key := range v.Bad {
			if w := Witness(ops, key); w != "" {
				r.logf("witness for %s: %s", key, w)
				r.rep.Witnesses = append(r.rep.Witnesses, w)
			}
		}
	}
	return nil
}

// recheckAll reads every block checked before and compares it with its
// final value: data acknowledged and read back must survive every later
// fault. A block may also hold a value of an unknown write (it may land
// late).
func (r *runner) recheckAll(ctx context.Context) error {
	byVol := map[string][]Key{}
	for k := range r.finals {
		byVol[k.Vol] = append(byVol[k.Vol], k)
	}
	changed := 0
	for vol, ks := range byVol {
		sortKeys(ks)
		rctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		h := NewHistory() // these reads are compared, not checked by porcupine
		vals, err := readFinal(rctx, h, r.c.MDSAddr(), vol, ks, 2000)
		cancel()
		if err != nil {
			return fmt.Errorf("re-read of every checked block: %w", err)
		}
		for _, k := range ks {
			want := r.finals[k]
			if got := vals[k]; got != want.value && !want.late[got] {
				changed++
				r.rep.Changed = append(r.rep.Changed, fmt.Sprintf("%s: read %d after all faults, %d when its generation was checked", k, got, want.value))
			}
		}
	}
	r.logf("re-read %d checked blocks at the end: %d changed", len(r.finals), changed)
	if changed > 0 {
		r.saveEvidence("recheck", nil)
	}
	return nil
}

// maxEvidence bounds the anomalies whose evidence a run keeps.
const maxEvidence = 5

// saveEvidence writes the visualization of a failed check and copies
// nothing else: the daemons' logs are already in the run directory.
func (r *runner) saveEvidence(name string, v *Verdict) {
	dir := filepath.Join(r.cfg.Dir, "evidence")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		r.logf("evidence: %v", err)
		return
	}
	r.rep.EvidenceDir = dir
	if v != nil {
		path := filepath.Join(dir, name+".html")
		if err := v.Visualize(path); err != nil {
			r.logf("evidence: visualize: %v", err)
		} else {
			r.logf("evidence: porcupine visualization in %s", path)
		}
	}
	r.logf("evidence: daemon logs in %s", filepath.Join(r.cfg.Dir, "logs"))
}

// saveOps writes the operations on the failing keys as JSON lines.
func (r *runner) saveOps(name string, ops []Op, v Verdict) {
	bad := map[Key]bool{}
	for _, ks := range [][]Key{v.Bad, v.Lost, v.Foreign} {
		for _, k := range ks {
			bad[k] = true
		}
	}
	path := filepath.Join(r.cfg.Dir, "evidence", name+"-ops.jsonl")
	f, err := os.Create(path)
	if err != nil {
		r.logf("evidence: %v", err)
		return
	}
	defer f.Close()
	enc := json.NewEncoder(f)
	for _, op := range ops {
		if bad[op.Key] {
			_ = enc.Encode(op)
		}
	}
	r.logf("evidence: operations of the failing keys in %s", path)
}
