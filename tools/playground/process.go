package playground

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// child is one supervised process: started, restarted when it dies
// unexpectedly, stopped with SIGTERM then SIGKILL.
type child struct {
	pg      *Playground
	name    string
	bin     string
	args    []string
	logPath string
	state   ProcessState // static fields: addresses, data dir, zone, log

	mu struct {
		sync.Mutex
		cmd       *exec.Cmd
		exited    chan struct{} // closed when the current process has been reaped
		startedAt time.Time
		restarts  int
		stopping  bool
		launched  bool
	}
	stopCh chan struct{} // closed by stop: ends the supervision loop's waits
	done   chan struct{} // closed when the supervision loop returns
}

func newChild(pg *Playground, name, bin string, args []string, st ProcessState) *child {
	c := &child{pg: pg, name: name, bin: bin, args: args, logPath: st.Log, state: st,
		stopCh: make(chan struct{}), done: make(chan struct{})}
	c.state.Name = name
	return c
}

// start starts the process once, appending its output to its log file.
func (c *child) start() error {
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("%s: open log: %w", c.name, err)
	}
	defer logf.Close() // the child holds its own descriptor
	fmt.Fprint(logf, startLine(c.pg.cfg.LogFormat, time.Now(), c.bin, c.args))
	cmd := exec.Command(c.bin, c.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.pg.dir
	cmd.Env = append(os.Environ(), "CAIRN_MDS="+c.pg.mdsAddr())
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group: a Ctrl-C at the terminal reaches only the
		// playground, which stops the children in order.
		Setpgid: true,
		// If the playground dies without stopping it, it gets SIGTERM.
		Pdeathsig: syscall.SIGTERM,
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.stopping {
		return errStopping
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s: start %s: %w", c.name, c.bin, err)
	}
	c.mu.cmd = cmd
	c.mu.exited = make(chan struct{})
	c.mu.startedAt = time.Now()
	return nil
}

var errStopping = errors.New("stopping")

// startLine is the line a child's log gets before each start: the time and
// the command, in the log's format (a JSON log stays one object per line).
func startLine(format string, now time.Time, bin string, args []string) string {
	if format == "json" {
		b, err := json.Marshal(map[string]any{"time": now.Format(time.RFC3339Nano), "level": "INFO",
			"msg": "process started by the playground", "command": append([]string{bin}, args...)})
		if err == nil {
			return string(b) + "\n"
		}
	}
	return fmt.Sprintf("=== %s: %s %s\n", now.Format(time.RFC3339), bin, strings.Join(args, " "))
}

// launch starts supervising the process in the background, unless it is
// being stopped.
func (c *child) launch() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.stopping || c.mu.launched {
		return
	}
	c.mu.launched = true
	go c.supervise()
}

// supervise runs the process until stop, restarting it when it exits
// unexpectedly. While the playground is starting, an exit is fatal: it
// usually means a configuration problem that restarting does not fix.
func (c *child) supervise() {
	defer close(c.done)
	backoff := time.Second
	for {
		if err := c.start(); err != nil {
			if !errors.Is(err, errStopping) {
				c.pg.fail(err)
			}
			return
		}
		c.pg.saveState()
		c.mu.Lock()
		cmd, exited, started := c.mu.cmd, c.mu.exited, c.mu.startedAt
		c.mu.Unlock()
		err := cmd.Wait()
		close(exited)
		c.mu.Lock()
		stopping := c.mu.stopping
		c.mu.Unlock()
		if stopping {
			return
		}
		if err == nil {
			err = errors.New("exit status 0")
		}
		uptime := time.Since(started)
		if !c.pg.isReady() {
			c.pg.fail(fmt.Errorf("%s exited while the playground was starting (%v); last lines of %s:\n%s",
				c.name, err, c.logPath, tail(c.logPath, 15)))
			return
		}
		if uptime < 10*time.Second {
			backoff = min(2*backoff, 30*time.Second)
		} else {
			backoff = time.Second
		}
		c.mu.Lock()
		c.mu.restarts++
		n := c.mu.restarts
		c.mu.Unlock()
		c.pg.log.Warn("process exited unexpectedly; restarting", "process", c.name, "pid", cmd.Process.Pid,
			"err", err.Error(), "uptime", uptime.Round(time.Millisecond), "in", backoff, "restart", n, "log", c.logPath)
		c.pg.saveState()
		select {
		case <-c.stopCh:
			return
		case <-time.After(backoff):
		}
	}
}

// stop ends supervision, sends SIGTERM, and SIGKILL after timeout; it
// returns once the process is gone.
func (c *child) stop(timeout time.Duration) {
	c.mu.Lock()
	if c.mu.stopping {
		c.mu.Unlock()
		<-c.done
		return
	}
	c.mu.stopping = true
	cmd, exited, launched := c.mu.cmd, c.mu.exited, c.mu.launched
	c.mu.Unlock()
	close(c.stopCh)
	if !launched {
		close(c.done)
		return
	}
	if cmd != nil {
		select {
		case <-exited:
		default:
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(timeout):
				c.pg.log.Warn("process did not stop after SIGTERM; killing it", "process", c.name,
					"pid", cmd.Process.Pid, "waited", timeout)
				_ = cmd.Process.Kill()
				<-exited
			}
		}
	}
	<-c.done
}

// snapshot returns the child's state for the state file.
func (c *child) snapshot() ProcessState {
	st := c.state
	c.mu.Lock()
	defer c.mu.Unlock()
	st.Restarts = c.mu.restarts
	st.StartedAt = c.mu.startedAt
	if c.mu.cmd != nil {
		select {
		case <-c.mu.exited:
		default:
			st.PID = c.mu.cmd.Process.Pid
		}
	}
	return st
}

// running reports whether the process is alive, and since when.
func (c *child) running() (bool, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.cmd == nil {
		return false, time.Time{}
	}
	select {
	case <-c.mu.exited:
		return false, time.Time{}
	default:
		return true, c.mu.startedAt
	}
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > max {
		_, _ = f.Seek(st.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  " + string(bytes.Join(lines, []byte("\n  ")))
}
