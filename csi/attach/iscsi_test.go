package attach_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/test/cluster"
)

// This machine's kernel has no iSCSI initiator (no iscsi_tcp module, no
// iscsid): these tests run the iscsi attach's target for real, on a
// volume of an in-process cluster, with libiscsi's tools (iscsi-inq,
// iscsi-ls, iscsi-readcapacity16, qemu-img with iscsi:// URLs) as the
// initiators, and stand noKernel in for the kernel's initiator: it attaches
// nothing and says so. TestKernelISCSIAttach (kernel_iscsi_test.go) and
// csi's TestNodeKernelISCSI run against the real kernel and open-iscsi
// where asked (CAIRN_KERNEL_ISCSI=1).

// noKernel stands in for the node's kernel initiator: it records what the
// attach asks of it and logs nothing in (Login returns no device). Its
// Rescan asks the target for the capacity with iscsi-readcapacity16 and
// the CHAP of the login, as the kernel's rescan reads it.
type noKernel struct {
	t *testing.T
	// anySession: HasSession is true of every target (a takeover in a
	// process that did not log in).
	anySession bool

	mu      sync.Mutex
	logins  []attach.ISCSINode
	logouts []attach.ISCSINode
	rescans int
}

func (k *noKernel) Login(_ context.Context, n attach.ISCSINode) (string, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.logins = append(k.logins, n)
	return "", nil
}

func (k *noKernel) Rescan(_ context.Context, _ string) (int64, error) {
	k.mu.Lock()
	k.rescans++
	n := k.logins[len(k.logins)-1]
	k.mu.Unlock()
	return readCapacity(k.t, iscsiURL(n, n.CHAP.Secret, true))
}

func (k *noKernel) Logout(_ context.Context, n attach.ISCSINode) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.logouts = append(k.logouts, n)
	return nil
}

func (k *noKernel) HasSession(target string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, n := range k.logins {
		if n.Target == target {
			return true
		}
	}
	return k.anySession
}

// useNoKernel makes the iscsi attach use k until the test ends.
func useNoKernel(t *testing.T) *noKernel {
	k := &noKernel{t: t}
	t.Cleanup(attach.SetISCSIInitiator(func(string) attach.ISCSIInitiator { return k }))
	return k
}

// iscsiURL is libiscsi's URL of the LUN of a node record, logging in with
// secret (and checking the target's secret when mutual).
func iscsiURL(n attach.ISCSINode, secret string, mutual bool) string {
	u := "iscsi://" + url.PathEscape(n.CHAP.User) + "%" + url.PathEscape(secret) + "@" + n.Portal + "/" + n.Target + "/0"
	if mutual {
		u += "?target_user=" + url.QueryEscape(n.CHAP.MutualUser) + "&target_password=" + url.QueryEscape(n.CHAP.MutualSecret)
	}
	return u
}

// nodeOf is the node record of an iscsi attach's record.
func nodeOf(rec *attach.Record) attach.ISCSINode {
	return attach.ISCSINode{Portal: rec.Portal, Target: rec.Target, CHAP: *rec.CHAP}
}

var totalSize = regexp.MustCompile(`Total size:(\d+)`)

// readCapacity is the LUN's size as iscsi-readcapacity16 reads it.
func readCapacity(t *testing.T, u string) (int64, error) {
	out, err := testtool.Run(t, time.Minute, "iscsi-readcapacity16", u)
	if err != nil {
		return 0, fmt.Errorf("iscsi-readcapacity16: %w: %s", err, out)
	}
	m := totalSize.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("iscsi-readcapacity16 printed no size:\n%s", out)
	}
	return strconv.ParseInt(m[1], 10, 64)
}

// iscsiVolume starts a cluster with a volume of size bytes and opens it
// for writing.
func iscsiVolume(t *testing.T, name string, size uint64) (*cluster.Cluster, *client.Volume) {
	t.Helper()
	testtool.Need(t, "iscsi-inq", "iscsi-ls", "iscsi-readcapacity16", "qemu-img")
	c := cluster.Start(t, cluster.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: name, Size: size}); err != nil {
		t.Fatal(err)
	}
	vol, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, name, client.Options{Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	return c, vol
}

// readBack reads length bytes at off of a volume through a read-only
// handle of its own (which fences no one).
func readBack(t *testing.T, c *cluster.Cluster, name string, off, length int64) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ro, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, name, client.Options{ReadOnly: true, Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	b := make([]byte, length)
	if _, err := ro.ReadAt(ctx, b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// The iscsi attach's target on a volume of a real cluster: only the
// record's CHAP logs in (mutual too), discovery included; the kernel is
// asked to log in with the record's portal, target, secrets and reattach
// timeout; data written through iSCSI is the volume's, and the volume's
// data is what iSCSI reads; a volume grown is seen by initiators after the
// control socket's resize; a stop logs the kernel out and closes the
// portal.
func TestISCSIExportServesTheVolume(t *testing.T) {
	c, vol := iscsiVolume(t, "pvc-iscsi", 64*mib)
	k := useNoKernel(t)
	rec, stop, _ := serveSpec(t, attach.Spec{Volume: "pvc-iscsi", Node: "n", Attach: attach.AttachISCSI, ReattachTimeout: 45 * time.Second}, vol)

	// The record: a loopback portal, a target of this attachment, random
	// secrets, readable by root only.
	host, port, err := net.SplitHostPort(rec.Portal)
	if err != nil || host != "127.0.0.1" || port == "0" {
		t.Fatalf("portal %q (%v)", rec.Portal, err)
	}
	if !strings.HasPrefix(rec.Target, "iqn.2026-11.io.cairn.csi:pvc-iscsi.") || rec.CHAP == nil ||
		len(rec.CHAP.Secret) < 24 || len(rec.CHAP.MutualSecret) < 24 || rec.CHAP.Secret == rec.CHAP.MutualSecret {
		t.Fatalf("record %+v", rec)
	}
	if fi, err := os.Stat(filepath.Join(rec.Dir, "record.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("record file: %v, %v", fi.Mode(), err)
	}
	if got, err := attach.ReadRecord(rec.Dir); err != nil || got.Target != rec.Target || *got.CHAP != *rec.CHAP || got.Portal != rec.Portal {
		t.Fatalf("record on disk %+v, %v", got, err)
	}
	n := nodeOf(rec)
	k.mu.Lock()
	if len(k.logins) != 1 || k.logins[0].Portal != rec.Portal || k.logins[0].Target != rec.Target || k.logins[0].CHAP != *rec.CHAP ||
		k.logins[0].ReplacementTimeout != 45*time.Second {
		t.Fatalf("the kernel was asked to log in with %+v; record %+v", k.logins, rec)
	}
	k.mu.Unlock()

	// CHAP: the record's secret logs in, with the target's checked too;
	// anything else is refused.
	for _, tc := range []struct {
		name string
		url  string
		ok   bool
	}{
		{"the record's secret", iscsiURL(n, n.CHAP.Secret, false), true},
		{"mutual", iscsiURL(n, n.CHAP.Secret, true), true},
		{"a wrong secret", iscsiURL(n, n.CHAP.Secret[1:]+"x", false), false},
		{"the target's secret as the initiator's", iscsiURL(n, n.CHAP.MutualSecret, false), false},
		{"no CHAP", "iscsi://" + rec.Portal + "/" + rec.Target + "/0", false},
		{"a target that checks out wrong", strings.Replace(iscsiURL(n, n.CHAP.Secret, true), "target_password=", "target_password=x", 1), false},
	} {
		out, err := testtool.Run(t, time.Minute, "iscsi-inq", tc.url)
		switch {
		case tc.ok && (err != nil || !strings.Contains(out, "Vendor:CAIRN")):
			t.Errorf("%s: %v\n%s", tc.name, err, out)
		case !tc.ok && err == nil:
			t.Errorf("%s: logged in:\n%s", tc.name, out)
		}
	}
	if out, err := testtool.Run(t, time.Minute, "iscsi-ls", "iscsi://"+rec.Portal); err == nil {
		t.Errorf("discovery without CHAP:\n%s", out)
	}
	out := testtool.MustRun(t, time.Minute, "iscsi-ls", "iscsi://"+n.CHAP.User+"%"+n.CHAP.Secret+"@"+rec.Portal)
	if strings.Count(out, "Target:") != 1 || !strings.Contains(out, "Target:"+rec.Target+" Portal:"+rec.Portal) {
		t.Errorf("discovery lists:\n%s", out)
	}

	// The LUN is the volume: its size and blocks.
	u := iscsiURL(n, n.CHAP.Secret, false)
	out = testtool.MustRun(t, time.Minute, "iscsi-readcapacity16", u)
	if !strings.Contains(out, "Total size:"+strconv.Itoa(64*mib)) || !strings.Contains(out, "LOGICAL BLOCK LENGTH IN BYTES:"+strconv.FormatInt(vol.BlockSize(), 10)) {
		t.Fatalf("capacity:\n%s", out)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "in.raw")
	data := testtool.RandomFile(t, img, 8*mib)
	testtool.MustRun(t, 2*time.Minute, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img, u)
	if !bytes.Equal(readBack(t, c, "pvc-iscsi", 0, 8*mib), data) {
		t.Fatal("the volume does not hold what was written through iSCSI")
	}
	fresh := bytes.Repeat([]byte("written through the client "), 2*mib/27+1)[:2*mib]
	if _, err := vol.WriteAt(context.Background(), fresh, 40*mib); err != nil {
		t.Fatal(err)
	}
	back := filepath.Join(dir, "back.raw")
	testtool.MustRun(t, 2*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", u, back)
	got, err := os.ReadFile(back)
	if err != nil || len(got) != 64*mib || !bytes.Equal(got[:8*mib], data) || !bytes.Equal(got[40*mib:42*mib], fresh) {
		t.Fatalf("read through iSCSI: %d bytes, %v", len(got), err)
	}

	// Growing: the volume is extended, the control socket makes the
	// attach learn it and rescan; initiators read the new capacity.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.Conn.Volumes().ExtendVolume(ctx, &mdspb.ExtendVolumeRequest{Name: "pvc-iscsi", NewSize: 128 * mib}); err != nil {
		t.Fatal(err)
	}
	if size, err := rec.Resize(ctx); err != nil || size != 128*mib {
		t.Fatalf("resize: %d, %v", size, err)
	}
	k.mu.Lock()
	rescans := k.rescans
	k.mu.Unlock()
	if rescans != 1 {
		t.Fatalf("%d rescans after a resize", rescans)
	}
	if size, err := readCapacity(t, u); err != nil || size != 128*mib {
		t.Fatalf("capacity after growing: %d, %v", size, err)
	}
	if st, err := rec.Status(ctx); err != nil || st.Error != "" || st.Size != 128*mib {
		t.Fatalf("status %+v, %v", st, err)
	}

	// Stopping logs the kernel out (while the target still serves) and
	// closes the portal.
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	logouts := k.logouts
	k.mu.Unlock()
	if len(logouts) != 1 || logouts[0].Target != rec.Target || logouts[0].Portal != rec.Portal {
		t.Fatalf("logouts %+v", logouts)
	}
	if conn, err := net.DialTimeout("tcp", rec.Portal, time.Second); err == nil {
		conn.Close()
		t.Fatalf("the portal %s still accepts connections after the stop", rec.Portal)
	}
}

// A read-only attach exports a write-protected LUN.
func TestISCSIReadOnlyExport(t *testing.T) {
	c, vol := iscsiVolume(t, "pvc-iscsi-ro", 64*mib)
	vol.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ro, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "pvc-iscsi-ro", client.Options{ReadOnly: true, Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	useNoKernel(t)
	rec, _, _ := serveSpec(t, attach.Spec{Volume: "pvc-iscsi-ro", Node: "n", Attach: attach.AttachISCSI, ReadOnly: true}, ro)
	img := filepath.Join(t.TempDir(), "in.raw")
	testtool.RandomFile(t, img, mib)
	if out, err := testtool.Run(t, time.Minute, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", img, iscsiURL(nodeOf(rec), rec.CHAP.Secret, false)); err == nil {
		t.Fatalf("wrote to a read-only attach:\n%s", out)
	}
	if !bytes.Equal(readBack(t, c, "pvc-iscsi-ro", 0, mib), make([]byte, mib)) {
		t.Fatal("a read-only attach changed the volume")
	}
}

// A takeover serves the portal, target and secrets of the record of the
// attach before it; it refuses a record of another target.
func TestISCSITakeoverNeedsTheRecordsTarget(t *testing.T) {
	_, vol := iscsiVolume(t, "pvc-iscsi-t", 64*mib)
	useNoKernel(t)
	rec, stop, _ := serveSpec(t, attach.Spec{Volume: "pvc-iscsi-t", Node: "n", Attach: attach.AttachISCSI}, vol)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	err := attach.Serve(context.Background(), attach.Spec{Volume: "pvc-iscsi-t", Node: "n", Attach: attach.AttachISCSI, Dir: rec.Dir,
		Takeover: &attach.Takeover{Target: rec.Target + "x"}}, keepOpen{vol}, io.Discard, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "is of target") {
		t.Fatalf("takeover of another target: %v", err)
	}
}

// keepOpen leaves the volume open when Serve closes it.
type keepOpen struct{ *client.Volume }

func (keepOpen) Close() error { return nil }

// The attach process dies (SIGKILL) while an initiator writes; a new one
// takes over: it listens on the same portal with the same target and
// secrets, and the initiator's session logs in again by itself (libiscsi
// reconnects, as the kernel's session does within its replacement
// timeout) and sends again what was not answered. Every byte written
// across the restart is the volume's, read back through the Cairn client.
func TestISCSIAttachProcessRestartsOnItsPortal(t *testing.T) {
	c, vol := iscsiVolume(t, "pvc-iscsi-r", 64*mib)
	vol.Close()
	dir := t.TempDir()
	first := startISCSIChild(t, c, "pvc-iscsi-r", dir, "")
	n := nodeOf(first.rec)
	u := iscsiURL(n, n.CHAP.Secret, false)

	// An initiator writes 24 MiB at 6 MiB/s: the restart happens in the
	// middle of it.
	img := filepath.Join(t.TempDir(), "in.raw")
	data := testtool.RandomFile(t, img, 24*mib)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	writer := exec.CommandContext(ctx, "qemu-img", "convert", "-n", "-r", strconv.Itoa(6*mib), "-f", "raw", "-O", "raw", img, u)
	var out bytes.Buffer
	writer.Stdout, writer.Stderr = &out, &out
	if err := writer.Start(); err != nil {
		t.Fatal(err)
	}
	wrote := make(chan error, 1)
	go func() { wrote <- writer.Wait() }()
	time.Sleep(1500 * time.Millisecond)

	first.kill(t)
	select {
	case err := <-wrote:
		t.Fatalf("the write ended (%v) before the attach process was killed: it crosses no restart\n%s", err, out.String())
	default:
	}
	if conn, err := net.DialTimeout("tcp", first.rec.Portal, time.Second); err == nil {
		conn.Close()
		t.Fatal("the portal accepts connections with its attach process dead")
	}
	time.Sleep(time.Second)
	second := startISCSIChild(t, c, "pvc-iscsi-r", dir, first.rec.Target)
	if second.rec.Portal != first.rec.Portal || second.rec.Target != first.rec.Target || *second.rec.CHAP != *first.rec.CHAP ||
		second.rec.Pid == first.rec.Pid {
		t.Fatalf("after the takeover: %+v; before %+v", second.rec, first.rec)
	}
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatalf("the write across the restart: %v\n%s", err, out.String())
		}
	case <-ctx.Done():
		b, _ := os.ReadFile(second.log)
		t.Fatalf("the write across the restart did not finish:\n%s\nthe second attach process's log:\n%s", out.String(), b)
	}
	// Same portal, same secrets: a new session logs in; a wrong secret
	// still does not.
	if out, err := testtool.Run(t, time.Minute, "iscsi-inq", u); err != nil {
		t.Fatalf("login after the takeover: %v\n%s", err, out)
	}
	if out, err := testtool.Run(t, time.Minute, "iscsi-inq", iscsiURL(n, "not-"+n.CHAP.Secret, false)); err == nil {
		t.Fatalf("a wrong secret logged in after the takeover:\n%s", out)
	}
	second.stop(t)
	if !bytes.Equal(readBack(t, c, "pvc-iscsi-r", 0, 24*mib), data) {
		t.Fatal("the volume does not hold what was written across the restart")
	}
}

// Environment of an attach child process (the test binary run again by
// TestMain: an attach process with noKernel for the kernel's initiator).
const (
	childDirEnv      = "CAIRN_TEST_ISCSI_CHILD_DIR"
	childMDSEnv      = "CAIRN_TEST_ISCSI_CHILD_MDS"
	childVolumeEnv   = "CAIRN_TEST_ISCSI_CHILD_VOLUME"
	childTakeoverEnv = "CAIRN_TEST_ISCSI_CHILD_TAKEOVER"
)

func TestMain(m *testing.M) {
	if os.Getenv(childDirEnv) != "" {
		os.Exit(iscsiChild())
	}
	os.Exit(m.Run())
}

// iscsiChild is an iscsi attach process serving a cluster's volume until
// SIGTERM, its record on stdout, its log on stderr.
func iscsiChild() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	k := &noKernel{anySession: true}
	attach.SetISCSIInitiator(func(string) attach.ISCSIInitiator { return k })
	spec := attach.Spec{Volume: os.Getenv(childVolumeEnv), Node: "n", Attach: attach.AttachISCSI, Dir: os.Getenv(childDirEnv),
		ReattachTimeout: time.Minute}
	if t := os.Getenv(childTakeoverEnv); t != "" {
		spec.Takeover = &attach.Takeover{Target: t}
	}
	octx, cancel := context.WithTimeout(ctx, time.Minute)
	vol, err := client.OpenWithOptions(octx, []string{os.Getenv(childMDSEnv)}, spec.Volume, client.Options{Logger: log})
	cancel()
	if err != nil {
		log.Error("open", "err", err)
		return 1
	}
	if err := attach.Serve(ctx, spec, vol, os.Stdout, log); err != nil {
		log.Error("serve", "err", err)
		return 1
	}
	return 0
}

// iscsiChildProc is a running attach child process.
type iscsiChildProc struct {
	cmd  *exec.Cmd
	rec  *attach.Record
	done chan error
	log  string // its log file
}

// startISCSIChild starts an attach child process on volume in dir (taking
// over the session with target, if not "") and returns once it serves.
func startISCSIChild(t *testing.T, c *cluster.Cluster, volume, dir, target string) *iscsiChildProc {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), childDirEnv+"="+dir, childMDSEnv+"="+c.MDS.Addr(), childVolumeEnv+"="+volume, childTakeoverEnv+"="+target)
	logf, err := os.Create(filepath.Join(t.TempDir(), "child.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &iscsiChildProc{cmd: cmd, done: make(chan error, 1), log: logf.Name()}
	lines := make(chan []byte, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadBytes('\n')
		lines <- line
		_, _ = io.Copy(io.Discard, out)
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // by pid (a process already waited for is not signalled)
		<-p.done
	})
	select {
	case line := <-lines:
		p.rec = &attach.Record{}
		if err := json.Unmarshal(line, p.rec); err != nil {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("attach child: %q: %v\n%s", line, err, b)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("attach child did not report")
	}
	return p
}

// kill kills the child (SIGKILL: no logout, no goodbye to the initiators)
// and waits for it.
func (p *iscsiChildProc) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := <-p.done; err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("killed child: %v", err)
	}
	p.done <- errors.New("already waited for")
}

// stop stops the child as the node does (SIGTERM) and waits for it.
func (p *iscsiChildProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Fatalf("attach child stopped with %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("attach child did not stop")
	}
}
