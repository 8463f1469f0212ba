package csi_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"cairn.io/cairn/csi"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/test/cluster"
)

// The node with --attach iscsi where the kernel has no iSCSI initiator
// (this project's machines: no iscsi_tcp module) refuses to start, saying
// what is missing and what to do.
func TestNodeAttachISCSIWithoutTheInitiator(t *testing.T) {
	why := attach.ISCSIUnavailable(attach.DefaultISCSIAdm)
	if why == nil {
		t.Skip("the iscsi attach can run here: its refusal is not shown")
	}
	_, err := csi.New(csi.Config{Endpoint: "unix://" + filepath.Join(t.TempDir(), "csi.sock"), MDSAddrs: []string{"127.0.0.1:1"},
		Mode: csi.ModeNode, NodeID: "n", StateDir: t.TempDir(), Attach: csi.AttachISCSI, Logger: testlog.New(t)})
	if err == nil || err.Error() != "csi: --attach iscsi: "+why.Error() {
		t.Fatalf("node with --attach iscsi here: %v; want the refusal %q", err, why)
	}
	if _, serr := os.Stat("/sys/module/iscsi_tcp"); serr != nil &&
		!strings.Contains(err.Error(), "the iscsi_tcp kernel module is not loaded: modprobe iscsi_tcp, or use --attach fuse") {
		t.Fatalf("without the iscsi_tcp module: %v", err)
	}
}

// needKernelISCSI skips a test of the kernel's iSCSI initiator unless it
// was asked for and can run (see the one in package attach).
func needKernelISCSI(t *testing.T) {
	t.Helper()
	if os.Getenv("CAIRN_KERNEL_ISCSI") != "1" {
		t.Skip("kernel iSCSI test not asked for: set CAIRN_KERNEL_ISCSI=1 to run it (it logs this machine's initiator in to targets on the loopback; needs root, the iscsi_tcp module, open-iscsi's iscsiadm and a running iscsid)")
	}
	if os.Geteuid() != 0 {
		t.Skip("CAIRN_KERNEL_ISCSI=1, but the node needs root (mounts, iscsiadm)")
	}
	if err := attach.ISCSIUnavailable(attach.DefaultISCSIAdm); err != nil {
		t.Skipf("CAIRN_KERNEL_ISCSI=1, but the iscsi attach cannot run here: %v", err)
	}
	for _, tool := range []string{"mkfs.xfs", "xfs_growfs", "blkid"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("CAIRN_KERNEL_ISCSI=1, but %s is not installed", tool)
		}
	}
}

// hasSession reports whether the kernel has a session with target.
func hasSession(target string) bool {
	names, _ := filepath.Glob("/sys/class/iscsi_session/session*/targetname")
	for _, n := range names {
		if b, err := os.ReadFile(n); err == nil && strings.TrimSpace(string(b)) == target {
			return true
		}
	}
	return false
}

// The kernel iSCSI attach end to end: stage (mkfs, mount) on /dev/sdX,
// write, grow online; the plugin "container restarts" (the plugin stops,
// its attach process is killed) while a pod keeps writing: the write
// waits in the kernel's session, the restarted plugin serves the same
// portal again, and the write completes on the same disk. Unstage logs
// the session out and deletes its node record; staging again attaches a
// new session and finds the files.
func TestNodeKernelISCSI(t *testing.T) {
	needKernelISCSI(t)
	c := cluster.Start(t, cluster.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	iscsiMode := func(cfg *csi.Config) { cfg.Attach = csi.AttachISCSI; cfg.ReattachTimeout = 2 * time.Minute }
	a := startNode(t, c, "node-a", iscsiMode)
	vc := mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, testFs)
	if _, err := a.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name: "pvc-iscsi", CapacityRange: &csipb.CapacityRange{RequiredBytes: 5 * seg}, VolumeCapabilities: []*csipb.VolumeCapability{vc},
	}); err != nil {
		t.Fatal(err)
	}
	base := t.TempDir()
	staging, target := a.stage(t, ctx, "pvc-iscsi", base)
	rec := readRecord(t, a, "pvc-iscsi")
	if !strings.HasPrefix(rec.Device, "/dev/sd") || rec.Attach != attach.AttachISCSI || !hasSession(rec.Target) {
		t.Fatalf("record %+v (session %t)", rec, hasSession(rec.Target))
	}
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	if err := writeSynced(filepath.Join(target, "before"), data); err != nil {
		t.Fatal(err)
	}
	// Online growth: a unit attention, a rescan, xfs_growfs.
	if _, err := a.ctl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{
		VolumeId: "pvc-iscsi", CapacityRange: &csipb.CapacityRange{RequiredBytes: 7 * seg}, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if nexp, err := a.node.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{
		VolumeId: "pvc-iscsi", VolumePath: target, CapacityRange: &csipb.CapacityRange{RequiredBytes: 7 * seg}}); err != nil || nexp.CapacityBytes != 7*seg {
		t.Fatalf("node expand %v, %v", nexp, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(target, &fs); err != nil || int64(fs.Blocks)*fs.Bsize <= 5*seg {
		t.Fatalf("file system is %d bytes after growing (%v)", int64(fs.Blocks)*fs.Bsize, err)
	}

	// The container restarts: the plugin stops, its attach process dies.
	a.stop()
	if err := unix.Kill(rec.Pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if rec.Alive() {
			return fmt.Errorf("attach process %d still alive", rec.Pid)
		}
		return nil
	})
	// A pod writes meanwhile: its fsync waits in the kernel's session.
	during := bytes.Repeat([]byte("written while no attach process ran "), 1<<14)
	wrote := make(chan error, 1)
	go func() { wrote <- writeSynced(filepath.Join(target, "during"), during) }()
	time.Sleep(2 * time.Second)
	a2 := restartNode(t, c, a, iscsiMode)
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatalf("the write across the takeover failed: %v", err)
		}
	case <-time.After(3 * time.Minute):
		t.Fatal("the write across the takeover did not complete")
	}
	now := readRecord(t, a2, "pvc-iscsi")
	if now.Device != rec.Device || now.Target != rec.Target || now.Portal != rec.Portal || now.Pid == rec.Pid || !now.Alive() {
		t.Fatalf("after the restart: %+v, before %+v", now, rec)
	}
	health, err := a2.node.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: "pvc-iscsi"})
	if err != nil || len(health.VolumeHealth.GetHealthStatuses()) != 0 {
		t.Fatalf("health after the takeover: %v, %v", health, err)
	}
	files := map[string][]byte{"before": data, "during": during}
	for name, want := range files {
		if got, err := os.ReadFile(filepath.Join(target, name)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes, %v", name, len(got), err)
		}
	}

	// Unstage: the session is logged out, its node record deleted, the
	// attach process gone.
	a2.unstage(t, ctx, "pvc-iscsi", staging, target)
	if hasSession(now.Target) {
		t.Fatalf("the kernel still has a session with %s after unstage", now.Target)
	}
	err = exec.Command(attach.DefaultISCSIAdm, "-m", "node", "-T", now.Target, "-p", now.Portal).Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 21 {
		t.Fatalf("the node record of %s after unstage: iscsiadm says %v, want exit status 21 (no records)", now.Target, err)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(now.Pid)); !os.IsNotExist(err) {
		t.Fatalf("attach process %d still runs after unstage", now.Pid)
	}

	// Stage again: a new session (another target, portal and secrets)
	// with the same files.
	staging, target = a2.stage(t, ctx, "pvc-iscsi", base)
	again := readRecord(t, a2, "pvc-iscsi")
	if again.Target == now.Target || !hasSession(again.Target) {
		t.Fatalf("staged again: %+v, before %+v", again, now)
	}
	for name, want := range files {
		if got, err := os.ReadFile(filepath.Join(target, name)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s after staging again: %d bytes, %v", name, len(got), err)
		}
	}
	a2.unstage(t, ctx, "pvc-iscsi", staging, target)
	if hasSession(again.Target) {
		t.Fatalf("the kernel still has a session with %s after the second unstage", again.Target)
	}
}
