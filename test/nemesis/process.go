package nemesis

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is one daemon of the cluster: a process started inside its host's
// network namespace, killed, paused and resumed by pid only, and restarted
// on the same data directory and address. When it exits on its own (a
// chunkserver whose WAL cannot sync exits on purpose) and Supervise is on,
// it is started again after RestartDelay, as a supervisor would.
type Proc struct {
	Name    string
	Command func() *exec.Cmd // builds the command line (inside the namespace)
	LogPath string
	// HealthURL answers 200 when the process serves.
	HealthURL string

	log func(format string, args ...any)

	mu struct {
		sync.Mutex
		cmd       *exec.Cmd
		exited    chan struct{}
		exitErr   error
		down      bool // held down by the harness: no supervised restart
		paused    bool
		starts    int
		unplanned int // exits the harness did not cause
		peakRSS   uint64
		lastExit  string
		startedAt time.Time
		backoff   time.Duration // next supervised restart's delay
	}
}

// RestartDelay is how long a supervised restart waits after an exit; it
// doubles, up to MaxRestartDelay, while the process keeps exiting within
// 10 s of its start (a crash loop).
const (
	RestartDelay    = 500 * time.Millisecond
	MaxRestartDelay = 8 * time.Second
)

// Start starts the process; it must not be running.
func (p *Proc) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.startLocked()
}

func (p *Proc) startLocked() error {
	if p.mu.cmd != nil {
		select {
		case <-p.mu.exited:
		default:
			return fmt.Errorf("%s is already running (pid %d)", p.Name, p.mu.cmd.Process.Pid)
		}
	}
	logf, err := os.OpenFile(p.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("%s: open log: %w", p.Name, err)
	}
	defer logf.Close() // the process holds its own descriptor
	cmd := p.Command()
	fmt.Fprintf(logf, "=== %s start: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(cmd.Args, " "))
	cmd.Stdout, cmd.Stderr = logf, logf
	// SIGKILL when the test process dies: nothing outlives the test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s: start: %w", p.Name, err)
	}
	exited := make(chan struct{})
	p.mu.cmd, p.mu.exited, p.mu.exitErr = cmd, exited, nil
	p.mu.down, p.mu.paused = false, false
	p.mu.starts++
	p.mu.startedAt = time.Now()
	go p.wait(cmd, exited)
	return nil
}

// wait reaps the process and restarts it when it exited on its own.
func (p *Proc) wait(cmd *exec.Cmd, exited chan struct{}) {
	err := cmd.Wait()
	p.mu.Lock()
	p.mu.exitErr = err
	close(exited)
	if p.mu.down || p.mu.cmd != cmd {
		p.mu.Unlock()
		return
	}
	p.mu.unplanned++
	p.mu.lastExit = fmt.Sprintf("%v; last lines of %s:\n%s", err, p.LogPath, tail(p.LogPath, 8))
	if time.Since(p.mu.startedAt) < 10*time.Second && p.mu.backoff > 0 {
		p.mu.backoff = min(2*p.mu.backoff, MaxRestartDelay)
	} else {
		p.mu.backoff = RestartDelay
	}
	delay := p.mu.backoff
	p.mu.Unlock()
	p.log("%s (pid %d) exited on its own: %v; restarting it in %v", p.Name, cmd.Process.Pid, err, delay)
	time.Sleep(delay)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.down || p.mu.cmd != cmd {
		return
	}
	if err := p.startLocked(); err != nil {
		p.log("%s: supervised restart failed: %v", p.Name, err)
	}
}

// Pid returns the running process's id, or 0.
func (p *Proc) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.cmd == nil {
		return 0
	}
	select {
	case <-p.mu.exited:
		return 0
	default:
		return p.mu.cmd.Process.Pid
	}
}

// Running reports whether the process is alive.
func (p *Proc) Running() bool { return p.Pid() != 0 }

// Kill sends SIGKILL to the process (by pid), holds it down, and waits until
// it has been reaped. Its peak RSS is sampled first.
func (p *Proc) Kill() error {
	p.SampleRSS()
	p.mu.Lock()
	p.mu.down = true
	cmd, exited := p.mu.cmd, p.mu.exited
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	default:
	}
	if err := syscall.Kill(cmd.Process.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill %s (pid %d): %w", p.Name, cmd.Process.Pid, err)
	}
	select {
	case <-exited:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s (pid %d) not reaped 30 s after SIGKILL", p.Name, cmd.Process.Pid)
	}
}

// Pause stops the process with SIGSTOP.
func (p *Proc) Pause() error { return p.signal(syscall.SIGSTOP, true) }

// Resume continues a paused process with SIGCONT.
func (p *Proc) Resume() error { return p.signal(syscall.SIGCONT, false) }

func (p *Proc) signal(sig syscall.Signal, paused bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.cmd == nil {
		return fmt.Errorf("%s never started", p.Name)
	}
	select {
	case <-p.mu.exited:
		return fmt.Errorf("%s is not running", p.Name)
	default:
	}
	if err := syscall.Kill(p.mu.cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("%v %s (pid %d): %w", sig, p.Name, p.mu.cmd.Process.Pid, err)
	}
	p.mu.paused = paused
	return nil
}

// Stop ends the process for good: SIGCONT (if paused), SIGTERM, and
// SIGKILL after timeout.
func (p *Proc) Stop(timeout time.Duration) {
	p.SampleRSS()
	p.mu.Lock()
	p.mu.down = true
	cmd, exited := p.mu.cmd, p.mu.exited
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(cmd.Process.Pid, syscall.SIGCONT)
	_ = syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(timeout):
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
}

// SampleRSS reads the process's peak resident set (VmHWM) and keeps the
// largest seen over all its lives.
func (p *Proc) SampleRSS() {
	pid := p.Pid()
	if pid == 0 {
		return
	}
	kb, err := vmHWM(pid)
	if err != nil {
		return
	}
	p.mu.Lock()
	p.mu.peakRSS = max(p.mu.peakRSS, kb<<10)
	p.mu.Unlock()
}

// PeakRSS returns the largest VmHWM sampled, in bytes.
func (p *Proc) PeakRSS() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mu.peakRSS
}

// Counts returns how often the process was started and how often it exited
// on its own, with the last such exit.
func (p *Proc) Counts() (starts, unplanned int, lastExit string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mu.starts, p.mu.unplanned, p.mu.lastExit
}

// vmHWM reads VmHWM (kB) from /proc/<pid>/status.
func vmHWM(pid int) (uint64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			return strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, errors.New("no VmHWM")
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > 64<<10 {
		b = b[len(b)-64<<10:]
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  " + strings.Join(lines, "\n  ")
}
