package attach

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"cairn.io/cairn/internal/certs"
)

// Subcommand is the argument that makes cairn-csi an attach process.
const Subcommand = "attach"

// Args is the command line of the attach process for spec, after the
// executable.
func Args(spec Spec) []string {
	args := []string{Subcommand, "--dir", spec.Dir, "--volume", spec.Volume, "--node-id", spec.Node,
		"--mds", strings.Join(spec.MDSAddrs, ",")}
	if spec.ReadOnly {
		args = append(args, "--read-only")
	}
	if spec.mode() != AttachFUSE {
		args = append(args, "--attach", spec.Attach)
	}
	if spec.ReattachTimeout > 0 {
		args = append(args, "--reattach-timeout", spec.ReattachTimeout.String())
	}
	if spec.mode() == AttachISCSI && spec.ISCSIAdm != "" {
		args = append(args, "--iscsiadm", spec.ISCSIAdm)
	}
	if t := spec.Takeover; t != nil {
		if spec.mode() == AttachISCSI {
			args = append(args, "--iscsi-takeover", t.Target)
		} else {
			args = append(args, "--nbd-takeover", t.Device, "--nbd-backend", t.Backend)
		}
	}
	if spec.TLS == (certs.Files{}) {
		return append(args, "--insecure")
	}
	return append(args, "--tls-cert", spec.TLS.Cert, "--tls-key", spec.TLS.Key, "--tls-ca", spec.TLS.CA)
}

// Start runs exe as the attach process for spec, in a session of its own
// (a restart of the caller leaves it running), with its log in the
// directory, and returns its record once the device is attached. When the
// process fails first, the error carries the end of its log.
func Start(ctx context.Context, exe string, spec Spec) (*Record, error) {
	if !filepath.IsAbs(spec.Dir) {
		return nil, fmt.Errorf("attach %s: directory %q is not absolute", spec.Volume, spec.Dir)
	}
	if err := os.MkdirAll(spec.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	logf, err := os.OpenFile(filepath.Join(spec.Dir, LogFile), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	defer logf.Close()
	cmd := exec.Command(exe, Args(spec)...)
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("attach %s: start %s: %w", spec.Volume, exe, err)
	}
	exited := make(chan error, 1)
	lines := make(chan []byte, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadBytes('\n')
		lines <- line
		// Reap the process whenever it ends, so that it leaves no zombie.
		exited <- cmd.Wait()
	}()
	fail := func(why error) (*Record, error) {
		return nil, fmt.Errorf("attach %s: %w%s", spec.Volume, why, logTail(spec.Dir))
	}
	select {
	case line := <-lines:
		if len(line) == 0 {
			// The process closed its output without a record: it failed.
			select {
			case err := <-exited:
				// What it recorded before it attached (an iscsi attach
				// records its session before the login) is undone.
				if rec, rerr := ReadRecord(spec.Dir); rerr == nil && spec.Takeover == nil {
					_ = rec.Cleanup(context.Background())
				}
				return fail(fmt.Errorf("the attach process ended (%v)", err))
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				return fail(errors.New("the attach process closed its output without attaching"))
			}
		}
		rec := &Record{}
		if err := json.Unmarshal(line, rec); err != nil {
			_ = cmd.Process.Kill()
			return fail(fmt.Errorf("the attach process reported %q: %w", line, err))
		}
		return rec, nil
	case <-ctx.Done():
		// Stop it before returning: a retried stage must not find a second
		// process mounting the same directory.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-lines:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-lines
		}
		<-exited
		switch rec, err := ReadRecord(spec.Dir); {
		case spec.Takeover != nil:
			// The record is the dead process's: its device holds the
			// IO of mounted file systems until a takeover succeeds.
		case err == nil:
			_ = rec.Cleanup(context.Background())
		default:
			_ = unmountFUSE(spec.Dir)
		}
		return fail(fmt.Errorf("the attach did not finish: %w", ctx.Err()))
	}
}

// logTail is the end of an attach process's log, for errors.
func logTail(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, LogFile))
	if err != nil || len(b) == 0 {
		return ""
	}
	b = bytes.TrimSpace(b)
	if len(b) > 800 {
		b = b[len(b)-800:]
	}
	return "; its log ends: " + string(b)
}

// Alive reports whether the record's process still runs (and is the attach
// process of that directory, not a later process with the same pid).
func (r *Record) Alive() bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(r.Pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "--dir" && args[i+1] == r.Dir {
			return stateOf(r.Pid) != 'Z'
		}
	}
	return false
}

// stateOf is a process's state letter from /proc (0 when gone).
func stateOf(pid int) byte {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
		return b[i+2]
	}
	return 0
}

// ErrDeviceBusy is returned by Stop while the device is still in use (a
// file system on it is mounted): stopping would fail its IO.
var ErrDeviceBusy = errors.New("attach: the device is still in use")

// Stop ends the attach process (SIGTERM: it detaches the device and closes
// the volume), waiting up to ctx's deadline before it kills it, then
// removes whatever a process that died left behind (the loop device, the
// FUSE mount, the nbd device, the iscsi session). It refuses with
// ErrDeviceBusy while the device is in use: the caller unmounts file
// systems on it first.
func (r *Record) Stop(ctx context.Context) error {
	if r.Alive() {
		if deviceBusy(r.Device) {
			return fmt.Errorf("stop the attach of %s: %w (%s is mounted or open)", r.Volume, ErrDeviceBusy, r.Device)
		}
		_ = syscall.Kill(r.Pid, syscall.SIGTERM)
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for r.Alive() {
			select {
			case <-ctx.Done():
				_ = syscall.Kill(r.Pid, syscall.SIGKILL)
				for i := 0; i < 100 && r.Alive(); i++ {
					time.Sleep(50 * time.Millisecond)
				}
				cerr := r.Cleanup(context.Background())
				return errors.Join(fmt.Errorf("attach process %d of %s did not stop: killed: %w", r.Pid, r.Volume, ctx.Err()), cerr)
			case <-t.C:
			}
		}
	}
	return r.Cleanup(ctx)
}

// Cleanup removes what an attach process that was killed leaves: the loop
// device, if it is still this attachment's, and the FUSE mount (fuse); the
// nbd device, if the kernel still has it configured for this attachment
// (nbd); the kernel's session and its node record (iscsi). It does nothing
// when they are gone.
func (r *Record) Cleanup(ctx context.Context) error {
	switch r.mode() {
	case AttachNBD:
		return r.cleanupNBD()
	case AttachISCSI:
		return r.cleanupISCSI(ctx)
	}
	if err := loopDetach(ctx, r.Device, r.Backing, backingFile(r.Dir)); err != nil {
		return err
	}
	return unmountFUSE(r.Dir)
}

// unmountFUSE unmounts an attachment's FUSE mount if it is mounted (lazily:
// a dead one cannot be unmounted otherwise).
func unmountFUSE(dir string) error {
	mnt := filepath.Join(dir, fuseDir)
	if mounted(mnt) {
		if err := syscall.Unmount(mnt, syscall.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount %s: %w", mnt, err)
		}
	}
	return nil
}

// mounted reports whether path is a mount point (in /proc/self/mountinfo).
func mounted(path string) bool {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && unescapeMount(f[4]) == path {
			return true
		}
	}
	return false
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// control calls the attach process's control socket.
func control(ctx context.Context, dir, method, path string) (*Status, error) {
	sock := filepath.Join(dir, controlSock)
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	req, err := http.NewRequestWithContext(ctx, method, "http://attach"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("attach process of %s: %w", dir, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("attach process: %s %s: %s", method, path, strings.TrimSpace(string(body)))
	}
	st := &Status{}
	if err := json.Unmarshal(body, st); err != nil {
		return nil, fmt.Errorf("attach process: %s %s answered %q: %w", method, path, body, err)
	}
	return st, nil
}

// Status asks the attach process whether the volume answers.
func (r *Record) Status(ctx context.Context) (*Status, error) {
	return control(ctx, r.Dir, http.MethodGet, "/status")
}

// Resize makes the attach process learn the volume's size and grow the
// device to it; it returns the new size.
func (r *Record) Resize(ctx context.Context) (int64, error) {
	st, err := control(ctx, r.Dir, http.MethodPost, "/resize")
	if err != nil {
		return 0, err
	}
	return st.Size, nil
}
