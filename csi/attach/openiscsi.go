package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"cairn.io/cairn/iscsi"
)

// The node's kernel initiator as the iscsi attach uses it: open-iscsi's
// iscsiadm, which asks the iscsid daemon of the host to log the kernel's
// iscsi_tcp driver in, and sysfs, where the kernel shows its sessions and
// their SCSI disks.

// DefaultISCSIAdm is the iscsiadm command the iscsi attach runs when
// Spec.ISCSIAdm names none.
const DefaultISCSIAdm = "iscsiadm"

// iscsidSocket is the abstract unix socket iscsid takes requests on
// (ISCSIADM_NAMESPACE in open-iscsi's mgmt_ipc.h). Abstract sockets belong
// to a network namespace: it is reachable only from the host's.
const iscsidSocket = "@ISCSIADM_ABSTRACT_NAMESPACE"

// iscsiadm exit statuses (open-iscsi's iscsi_err.h).
const (
	// iscsiErrNoObjsFound: no record, session or portal matched (logging
	// out of what is not logged in, deleting what is not there).
	iscsiErrNoObjsFound = 21
)

// ISCSIUnavailable says why this machine cannot attach volumes with
// --attach iscsi (nil when it can): the iscsi_tcp module must be loaded (a
// container cannot load it), iscsiadm (the command iscsiadm, a name or a
// path) must exist, and iscsid must answer on its control socket, which
// is in the host's network namespace.
func ISCSIUnavailable(iscsiadm string) error {
	if _, err := os.Stat("/sys/module/iscsi_tcp"); err != nil {
		return errors.New("the iscsi_tcp kernel module is not loaded: modprobe iscsi_tcp, or use --attach fuse")
	}
	if iscsiadm == "" {
		iscsiadm = DefaultISCSIAdm
	}
	if _, err := exec.LookPath(iscsiadm); err != nil {
		return fmt.Errorf("%s (open-iscsi) is not found: install open-iscsi, or use --attach fuse (%w)", iscsiadm, err)
	}
	c, err := net.DialTimeout("unix", iscsidSocket, 2*time.Second)
	if err != nil {
		return fmt.Errorf("iscsid does not answer on %s (%w): start it on the node (systemctl enable --now iscsid), and run the node plugin in the host's network namespace (hostNetwork: true), where its socket is; or use --attach fuse",
			iscsidSocket, err)
	}
	c.Close()
	return nil
}

// iscsiNode is a node record of open-iscsi: one target at one portal, with
// the settings the attach gives it.
type iscsiNode struct {
	// Portal is 127.0.0.1:PORT.
	Portal string
	// Target is the target's name (IQN).
	Target string
	// CHAP are the secrets: the initiator's (User, Secret) and the
	// target's (MutualUser, MutualSecret), which the kernel checks.
	CHAP iscsi.CHAP
	// ReplacementTimeout is node.session.timeo.replacement_timeout: how
	// long the kernel queues the session's IO while it logs in again.
	ReplacementTimeout time.Duration
}

// iscsiInitiator is the node's kernel initiator (a double in tests, where
// the kernel has no iscsi_tcp).
type iscsiInitiator interface {
	// Login creates the node record, logs in and returns the session's
	// disk (/dev/sdX) once the kernel has it.
	Login(ctx context.Context, n iscsiNode) (device string, err error)
	// Rescan makes the kernel read the disk's capacity again and returns
	// its size in bytes.
	Rescan(ctx context.Context, device string) (int64, error)
	// Logout logs the session out and deletes the node record; what is
	// not there is not an error.
	Logout(ctx context.Context, n iscsiNode) error
	// HasSession reports whether the kernel has a session with target (in
	// any state: logged in or logging in again).
	HasSession(target string) bool
}

// newISCSIInitiator returns the initiator that runs iscsiadm; a variable
// for tests.
var newISCSIInitiator = func(iscsiadm string) iscsiInitiator {
	if iscsiadm == "" {
		iscsiadm = DefaultISCSIAdm
	}
	return openISCSI{adm: iscsiadm, sys: "/sys", dev: "/dev"}
}

// openISCSI is the kernel initiator through iscsiadm and sysfs.
type openISCSI struct {
	adm string // the iscsiadm command
	sys string // where sysfs is mounted
	dev string // where the device nodes are
}

// nodeArgs select the node record of n.
func (n iscsiNode) nodeArgs() []string {
	return []string{"-m", "node", "-T", n.Target, "-p", n.Portal}
}

// loginCommands are the iscsiadm command lines (without the command) that
// create n's node record, set it up and log in. The record is not started
// at boot (node.startup manual): after a reboot the portal is gone until
// the node stages the volume again, with a new record.
func loginCommands(n iscsiNode) [][]string {
	timeout := max(1, int((n.ReplacementTimeout+time.Second-1)/time.Second))
	cmds := [][]string{slices.Concat(n.nodeArgs(), []string{"-o", "new"})}
	for _, kv := range [][2]string{
		{"node.startup", "manual"},
		{"node.session.timeo.replacement_timeout", strconv.Itoa(timeout)},
		{"node.session.auth.authmethod", "CHAP"},
		{"node.session.auth.username", n.CHAP.User},
		{"node.session.auth.password", n.CHAP.Secret},
		{"node.session.auth.username_in", n.CHAP.MutualUser},
		{"node.session.auth.password_in", n.CHAP.MutualSecret},
	} {
		cmds = append(cmds, slices.Concat(n.nodeArgs(), []string{"-o", "update", "-n", kv[0], "-v", kv[1]}))
	}
	return append(cmds, slices.Concat(n.nodeArgs(), []string{"--login"}))
}

// logoutCommands are the iscsiadm command lines that log n's session out
// and delete its node record.
func logoutCommands(n iscsiNode) [][]string {
	return [][]string{
		slices.Concat(n.nodeArgs(), []string{"--logout"}),
		slices.Concat(n.nodeArgs(), []string{"-o", "delete"}),
	}
}

// redacted is an iscsiadm command line fit for a log or an error: the
// values of settings whose name holds "password" are left out.
func redacted(args []string) string {
	out := slices.Clone(args)
	for i := 0; i+3 < len(out); i++ {
		if out[i] == "-n" && strings.Contains(out[i+1], "password") && out[i+2] == "-v" {
			out[i+3] = "(secret)"
		}
	}
	return strings.Join(out, " ")
}

// run runs iscsiadm with args; the error names the command (its secrets
// left out), the exit status and what iscsiadm said. okStatus are exit
// statuses that count as success.
func (o openISCSI) run(ctx context.Context, args []string, okStatus ...int) error {
	out, err := exec.CommandContext(ctx, o.adm, args...).CombinedOutput()
	if err == nil {
		return nil
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) && slices.Contains(okStatus, exit.ExitCode()) {
		return nil
	}
	return fmt.Errorf("%s %s: %w: %s", o.adm, redacted(args), err, strings.TrimSpace(string(out)))
}

// Login creates the node record, logs in and waits for the disk. A
// failed login leaves no record behind.
func (o openISCSI) Login(ctx context.Context, n iscsiNode) (string, error) {
	for _, args := range loginCommands(n) {
		if err := o.run(ctx, args); err != nil {
			_ = o.Logout(context.Background(), n)
			return "", err
		}
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if dev, ok := o.disk(n); ok {
			return dev, nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("logged in to %s at %s, but the kernel showed no disk of its LUN 0 (in %s/class/iscsi_session or %s): %w",
				n.Target, n.Portal, o.sys, byPath(o.dev, n), ctx.Err())
		case <-t.C:
		}
	}
}

// byPath is the link udev makes to the disk of n's LUN 0.
func byPath(dev string, n iscsiNode) string {
	return filepath.Join(dev, "disk", "by-path", "ip-"+n.Portal+"-iscsi-"+n.Target+"-lun-0")
}

// disk finds the disk of LUN 0 of n's session: through sysfs (the session
// whose targetname is n's, its SCSI device H:C:T:0, the block device under
// it), or through the link udev makes in /dev/disk/by-path.
func (o openISCSI) disk(n iscsiNode) (string, bool) {
	if s, ok := o.session(n.Target); ok {
		blocks, _ := filepath.Glob(filepath.Join(s, "device", "target*", "*:0", "block", "*"))
		if len(blocks) == 1 {
			if dev := filepath.Join(o.dev, filepath.Base(blocks[0])); exists(dev) {
				return dev, true
			}
		}
	}
	if dev, err := filepath.EvalSymlinks(byPath(o.dev, n)); err == nil {
		return dev, true
	}
	return "", false
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// session is the sysfs directory of the kernel's session with target.
func (o openISCSI) session(target string) (string, bool) {
	sessions, _ := filepath.Glob(filepath.Join(o.sys, "class", "iscsi_session", "session*"))
	for _, s := range sessions {
		if b, err := os.ReadFile(filepath.Join(s, "targetname")); err == nil && strings.TrimSpace(string(b)) == target {
			return s, true
		}
	}
	return "", false
}

// HasSession reports whether the kernel has a session with target.
func (o openISCSI) HasSession(target string) bool {
	_, ok := o.session(target)
	return ok
}

// Rescan asks the kernel to read the disk's capacity again (the SCSI
// device's rescan attribute: READ CAPACITY, after which the kernel takes
// the new size) and returns the disk's size.
func (o openISCSI) Rescan(_ context.Context, device string) (int64, error) {
	blk := filepath.Join(o.sys, "class", "block", filepath.Base(device))
	if err := os.WriteFile(filepath.Join(blk, "device", "rescan"), []byte("1"), 0); err != nil {
		return 0, fmt.Errorf("rescan %s: %w", device, err)
	}
	b, err := os.ReadFile(filepath.Join(blk, "size"))
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", device, err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", device, err)
	}
	return sectors * 512, nil // sysfs counts 512-byte sectors whatever the disk's block size
}

// Logout logs n's session out (iscsid sends a Logout; the kernel first
// flushes the disk's cache through the target) and deletes its node
// record. Without iscsiadm there is nothing to do while the kernel has no
// session.
func (o openISCSI) Logout(ctx context.Context, n iscsiNode) error {
	if _, err := exec.LookPath(o.adm); err != nil {
		if o.HasSession(n.Target) {
			return fmt.Errorf("log out of %s: %w", n.Target, err)
		}
		return nil
	}
	var errs []error
	for _, args := range logoutCommands(n) {
		errs = append(errs, o.run(ctx, args, iscsiErrNoObjsFound))
	}
	return errors.Join(errs...)
}
