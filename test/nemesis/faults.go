package nemesis

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"time"

	"cairn.io/cairn/internal/poll"
	"cairn.io/cairn/test/faultfs"
)

// The fault kinds, in the order a round of cycles is drawn from.
const (
	KillChunkServer       = "kill-chunkserver"
	KillMDS               = "kill-mds"
	KillGateway           = "kill-gateway"
	PauseChunkServer      = "pause-chunkserver"
	PauseMDS              = "pause-mds"
	PauseGateway          = "pause-gateway"
	PartitionChunkServers = "partition-chunkservers"
	PartitionClients      = "partition-clients"
	PowerCut              = "power-cut"
	FsyncEIOChunk         = "fsync-eio-chunk"
	FsyncEIOWAL           = "fsync-eio-wal"
	DiskFull              = "disk-full"
)

// AllFaults lists every fault kind.
var AllFaults = []string{KillChunkServer, KillMDS, KillGateway, PauseChunkServer, PauseMDS, PauseGateway,
	PartitionChunkServers, PartitionClients, PowerCut, FsyncEIOChunk, FsyncEIOWAL, DiskFull}

// fault is one injected fault, in phases. The runner logs each phase and
// bounds each wait.
type fault struct {
	kind, target string
	inject       func(ctx context.Context) error
	// effect waits until the fault shows (a process gone or stopped, a
	// sync failed); nil when injecting is the effect.
	effect func(ctx context.Context) error
	hold   time.Duration
	heal   func(ctx context.Context) error
	// cleanup runs after the cluster is healthy again.
	cleanup func(ctx context.Context) error
	// note is filled by the phases: what happened (pages lost, ...).
	note string
}

// Bounds of the phases.
const (
	effectTimeout = 45 * time.Second
	healTimeout   = 30 * time.Second
	// recoverTimeout bounds the wait for a healthy cluster after healing.
	recoverTimeout = 3 * time.Minute
)

// holdFor draws a hold time in [lo, hi).
func holdFor(rng *rand.Rand, lo, hi time.Duration) time.Duration {
	return lo + time.Duration(rng.Int64N(int64(hi-lo)))
}

// newFault sets up a fault of the given kind with targets drawn from rng.
func (r *runner) newFault(kind string, rng *rand.Rand) (*fault, error) {
	c := r.c
	switch kind {
	case KillChunkServer:
		i, led := r.leader(rng)
		f := r.killFault(kind, c.CS[i], rng)
		f.target += fmt.Sprintf(" (leads %d copysets)", led)
		return f, nil
	case KillMDS:
		return r.killFault(kind, c.MDS, rng), nil
	case KillGateway:
		return r.killFault(kind, c.GW, rng), nil
	case PauseChunkServer:
		i, led := r.leader(rng)
		f := pauseFault(kind, c.CS[i], rng)
		f.target += fmt.Sprintf(" (leads %d copysets)", led)
		return f, nil
	case PauseMDS:
		return pauseFault(kind, c.MDS, rng), nil
	case PauseGateway:
		return pauseFault(kind, c.GW, rng), nil
	case PartitionChunkServers:
		i := rng.IntN(len(c.CS))
		var others []string
		for j := range c.CS {
			if j != i {
				others = append(others, csName(j))
			}
		}
		return r.partitionFault(kind, csName(i)+" | other chunkservers", rng, func() error {
			return c.Net.Cut(csName(i), others...)
		}), nil
	case PartitionClients:
		// The gateway and this process lose one or two chunkservers.
		perm := rng.Perm(len(c.CS))[:1+rng.IntN(2)]
		var cut []string
		for _, i := range perm {
			cut = append(cut, csName(i))
		}
		return r.partitionFault(kind, "clients, gateway | "+strings.Join(cut, ","), rng, func() error {
			if err := c.Net.Cut(HostGateway, cut...); err != nil {
				return err
			}
			return c.Net.Cut(HostClient, cut...)
		}), nil
	case PowerCut:
		return r.powerCut(rng), nil
	case FsyncEIOChunk:
		return r.syncFault(kind, `(^|/)chunks/`, 1+rng.IntN(3), rng), nil
	case FsyncEIOWAL:
		return r.syncFault(kind, `(^|/)wal/`, 1, rng), nil
	case DiskFull:
		return r.diskFull(rng), nil
	}
	return nil, fmt.Errorf("unknown fault kind %q", kind)
}

// leader draws a chunkserver that leads copysets (any chunkserver when the
// MDS cannot tell), so that losing it costs elections.
func (r *runner) leader(rng *rand.Rand) (int, int) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	led, err := r.c.Leaderships(ctx)
	if err != nil {
		r.logf("leaderships: %v; drawing any chunkserver", err)
		return rng.IntN(len(r.c.CS)), -1
	}
	var leaders []int
	for i, n := range led {
		if n > 0 {
			leaders = append(leaders, i)
		}
	}
	if len(leaders) == 0 {
		return rng.IntN(len(r.c.CS)), 0
	}
	i := leaders[rng.IntN(len(leaders))]
	return i, led[i]
}

// killFault: SIGKILL by pid, down for a while, started again.
func (r *runner) killFault(kind string, p *Proc, rng *rand.Rand) *fault {
	return &fault{kind: kind, target: p.Name,
		inject: func(context.Context) error { return p.Kill() },
		hold:   holdFor(rng, 500*time.Millisecond, 3*time.Second),
		heal:   func(context.Context) error { return p.Start() },
	}
}

// pauseFault: SIGSTOP for longer than a read lease and an election
// timeout, then SIGCONT.
func pauseFault(kind string, p *Proc, rng *rand.Rand) *fault {
	return &fault{kind: kind, target: p.Name,
		inject: func(context.Context) error { return p.Pause() },
		effect: func(ctx context.Context) error {
			return poll.Until(ctx, p.Name+" stopped", func() error {
				st, err := procState(p.Pid())
				if err != nil {
					return err
				}
				if st != "T" {
					return fmt.Errorf("state %s", st)
				}
				return nil
			})
		},
		hold: holdFor(rng, time.Second, 4*time.Second),
		heal: func(context.Context) error { return p.Resume() },
	}
}

// partitionFault: nftables drops between hosts, then healed.
func (r *runner) partitionFault(kind, target string, rng *rand.Rand, cut func() error) *fault {
	return &fault{kind: kind, target: target,
		inject: func(context.Context) error { return cut() },
		hold:   holdFor(rng, 2*time.Second, 6*time.Second),
		heal:   func(context.Context) error { return r.c.Net.HealAll() },
	}
}

// powerCut: SIGKILL the faultfs chunkserver, drop every unsynced page,
// restart the filesystem and the chunkserver.
func (r *runner) powerCut(rng *rand.Rand) *fault {
	p := r.c.CS[FaultCS]
	f := &fault{kind: PowerCut, target: p.Name, hold: holdFor(rng, 0, time.Second)}
	f.inject = func(context.Context) error {
		if err := p.Kill(); err != nil {
			return err
		}
		rep, err := r.c.FS.Crash(faultfs.CrashOptions{})
		if err != nil {
			return err
		}
		f.note = fmt.Sprintf("%d unsynced pages in %d files lost", rep.PagesLost, rep.Files)
		return nil
	}
	f.heal = func(context.Context) error {
		r.c.FS.Restart()
		return p.Start()
	}
	return f
}

// syncFault: the next n fsyncs of matching files on the faultfs
// chunkserver fail with EIO (and lose the file's unsynced pages). For
// chunk files the chunkserver repairs or the MDS rebuilds; for the WAL
// the chunkserver exits and is restarted as a supervisor would.
func (r *runner) syncFault(kind, pattern string, n int, rng *rand.Rand) *fault {
	p := r.c.CS[FaultCS]
	fs := r.c.FS
	f := &fault{kind: kind, target: fmt.Sprintf("%s %s x%d", p.Name, pattern, n), hold: holdFor(rng, time.Second, 3*time.Second)}
	var rule faultfs.RuleID
	var before uint64
	var startsBefore int
	f.inject = func(context.Context) error {
		before = fs.Stats().SyncFaults
		startsBefore, _, _ = p.Counts()
		var err error
		rule, err = fs.FailSync(pattern, n)
		return err
	}
	f.effect = func(ctx context.Context) error {
		err := poll.Until(ctx, "an fsync to fail", func() error {
			if got := fs.Stats().SyncFaults; got == before {
				return errors.New("no fsync failed yet")
			}
			return nil
		})
		if err != nil {
			f.note = "did not fire: no matching fsync within the wait"
			return nil
		}
		f.note = fmt.Sprintf("%d fsyncs failed", fs.Stats().SyncFaults-before)
		if kind == FsyncEIOWAL {
			// The chunkserver exits on purpose; the supervisor restarts it.
			err := poll.Until(ctx, p.Name+" to exit and be restarted", func() error {
				if starts, _, _ := p.Counts(); starts == startsBefore {
					return errors.New("not restarted yet")
				}
				return nil
			})
			if err != nil {
				f.note += "; the chunkserver did not exit"
			} else {
				_, _, last := p.Counts()
				f.note += "; the chunkserver exited (" + firstLine(last) + ") and was restarted"
			}
		}
		return nil
	}
	f.heal = func(context.Context) error {
		fs.RemoveRule(rule)
		return nil
	}
	return f
}

// diskFull: the loop filesystem's free space is taken by a filler file,
// then freed.
func (r *runner) diskFull(rng *rand.Rand) *fault {
	d := r.c.Disk
	f := &fault{kind: DiskFull, target: r.c.CS[FullCS].Name, hold: holdFor(rng, 2*time.Second, 5*time.Second)}
	f.inject = func(context.Context) error {
		n, err := d.Fill()
		free, _ := d.FreeBytes()
		f.note = fmt.Sprintf("filler took %d MiB, %d KiB left", n>>20, free>>10)
		return err
	}
	f.heal = func(context.Context) error { return d.Free() }
	return f
}

// procState returns the state letter of /proc/<pid>/stat.
func procState(pid int) (string, error) {
	if pid == 0 {
		return "", errors.New("not running")
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+3 > len(s) {
		return "", fmt.Errorf("cannot parse /proc/%d/stat", pid)
	}
	return s[i+2 : i+3], nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return s
}
