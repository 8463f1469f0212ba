package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/test/faultfs"
	"cairn.io/cairn/tools/playground"
)

// csiProcess is a cairn-csi process (mode all) for one node.
type csiProcess struct {
	node  string
	sock  string
	state string
	cmd   *exec.Cmd
	ctl   csipb.ControllerClient
	nodes csipb.NodeClient
}

// startCSI runs cairn-csi --mode all for node against the playground's MDS
// and stops it (by pid) when the test ends; whatever it left attached is
// detached then.
func startCSI(t *testing.T, st *playground.State, node string) *csiProcess {
	t.Helper()
	dir := t.TempDir()
	p := &csiProcess{node: node, sock: filepath.Join(dir, "csi.sock"), state: filepath.Join(dir, "state")}
	logf, err := os.Create(filepath.Join(dir, "csi.log"))
	if err != nil {
		t.Fatal(err)
	}
	// The operator's certificate: the controller needs the operator role,
	// the node (and its attach processes) the client role.
	args := append([]string{"--mode", "all", "--node-id", node, "--endpoint", "unix://" + p.sock, "--state-dir", p.state,
		"--default-fs-type", "xfs", "--log-level", "debug"}, opsArgs(st)...)
	p.cmd = exec.Command(filepath.Join(binDir, "cairn-csi"), args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		_ = p.cmd.Wait()
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("cairn-csi %s log:\n%s", node, tail(b, 4000))
		}
		detachLeftovers(t, p.state)
	})
	conn, err := grpc.NewClient("unix://"+p.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p.ctl, p.nodes = csipb.NewControllerClient(conn), csipb.NewNodeClient(conn)
	// Ready once it answers and has registered the node with the MDS.
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := p.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{
			VolumeId: "no-such-volume", NodeId: node, VolumeCapability: mountCapability(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)})
		cancel()
		if err != nil && bytes.Contains([]byte(err.Error()), []byte(`volume "no-such-volume" does not exist`)) {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("cairn-csi for %s not ready: %v", node, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// detachLeftovers stops the attach processes a test left behind (by the
// pids in their records) and removes their loop devices and mounts.
func detachLeftovers(t *testing.T, state string) {
	dirs, _ := filepath.Glob(filepath.Join(state, "volumes", "*"))
	for _, dir := range dirs {
		rec, err := attach.ReadRecord(dir)
		if err != nil {
			continue
		}
		t.Errorf("volume %s still attached on %s when the test ended", rec.Volume, rec.Node)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if err := rec.Stop(ctx); err != nil {
			t.Errorf("detach %s: %v", rec.Volume, err)
		}
		cancel()
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func mountCapability(mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "xfs"}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

// needCSINode skips (or fails, in CI) where the node plugin cannot attach.
func needCSINode(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: builds the binaries and runs a multi-process cluster")
	}
	if os.Geteuid() != 0 {
		if testtool.InCI() {
			t.Fatal("the CSI end-to-end test needs root (mount, loop devices) in CI")
		}
		t.Skip("the CSI end-to-end test needs root (mount, loop devices)")
	}
	faultfs.RequireFUSE(t)
	testtool.Need(t, "losetup", "blkid", "mkfs.xfs", "xfs_growfs")
}

// TestCSIOnPlayground runs cairn-csi as its own process against the
// playground: the Kubernetes CSI sanity suite, then a volume formatted and
// written on one node, moved to a second that reads it back, and the first
// fenced once it is unpublished.
func TestCSIOnPlayground(t *testing.T) {
	needCSINode(t)
	dir := t.TempDir()
	base, err := playground.FindFreeBase(os.Getpid() + 13)
	if err != nil {
		t.Fatal(err)
	}
	pg := startPlayground(t, dir, base, "--volume-size", "1GiB")
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(pg.logTails())
		}
		pg.stop(t)
	})
	st := pg.state(t)
	a, b := startCSI(t, st, "node-a"), startCSI(t, st, "node-b")

	t.Run("sanity", func(t *testing.T) {
		cfg := sanity.NewTestConfig()
		cfg.Address = a.sock
		work := t.TempDir()
		cfg.TargetPath, cfg.StagingPath = filepath.Join(work, "target"), filepath.Join(work, "staging")
		cfg.TestVolumeSize, cfg.TestVolumeExpandSize = 1<<30, 2<<30 // whole segments
		cfg.IdempotentCount = 2
		sanity.Test(t, cfg)
	})

	t.Run("move and fence", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		work := t.TempDir()
		vc := mountCapability(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
		if _, err := a.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "pvc-e2e", VolumeCapabilities: []*csipb.VolumeCapability{vc}}); err != nil {
			t.Fatal(err)
		}
		stage := func(p *csiProcess, flags ...string) (string, string) {
			t.Helper()
			c := mountCapability(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
			c.GetMount().MountFlags = flags
			pub, err := p.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: "pvc-e2e", NodeId: p.node, VolumeCapability: c})
			if err != nil {
				t.Fatalf("publish to %s: %v", p.node, err)
			}
			staging, target := filepath.Join(work, "staging-"+p.node), filepath.Join(work, "target-"+p.node)
			t.Cleanup(func() {
				cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				_, _ = p.nodes.NodeUnpublishVolume(cctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "pvc-e2e", TargetPath: target})
				_, _ = p.nodes.NodeUnstageVolume(cctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "pvc-e2e", StagingTargetPath: staging})
			})
			if _, err := p.nodes.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "pvc-e2e", StagingTargetPath: staging,
				VolumeCapability: c, PublishContext: pub.PublishContext}); err != nil {
				t.Fatalf("stage on %s: %v", p.node, err)
			}
			if _, err := p.nodes.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "pvc-e2e", StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: c, PublishContext: pub.PublishContext}); err != nil {
				t.Fatalf("node-publish on %s: %v", p.node, err)
			}
			return staging, target
		}
		unstage := func(p *csiProcess, staging, target string) {
			t.Helper()
			if _, err := p.nodes.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "pvc-e2e", TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if _, err := p.nodes.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "pvc-e2e", StagingTargetPath: staging}); err != nil {
				t.Fatal(err)
			}
		}
		stagingA, targetA := stage(a)
		want := make([]byte, 4<<20)
		_, _ = rand.Read(want)
		if err := writeFileSynced(filepath.Join(targetA, "data"), want); err != nil {
			t.Fatal(err)
		}
		// Node a stays mounted while Kubernetes force-detaches it: the
		// unpublish fences it before it returns.
		if _, err := a.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: "pvc-e2e", NodeId: "node-a"}); err != nil {
			t.Fatal(err)
		}
		if err := writeFileSynced(filepath.Join(targetA, "late"), want[:1<<20]); err == nil {
			t.Fatal("node a wrote after it was unpublished")
		}
		// One kernel for both nodes: xfs needs nouuid for the second mount.
		stagingB, targetB := stage(b, "nouuid")
		if got, err := os.ReadFile(filepath.Join(targetB, "data")); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("node b reads %d bytes, %v; want the %d node a wrote", len(got), err, len(want))
		}
		if err := writeFileSynced(filepath.Join(targetB, "more"), want[:1<<20]); err != nil {
			t.Fatalf("node b writes: %v", err)
		}
		unstage(a, stagingA, targetA)
		unstage(b, stagingB, targetB)
		if _, err := b.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: "pvc-e2e", NodeId: "node-b"}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: "pvc-e2e"}); err != nil {
			t.Fatal(err)
		}
		for _, p := range []*csiProcess{a, b} {
			if dirs, _ := filepath.Glob(filepath.Join(p.state, "volumes", "*")); len(dirs) != 0 {
				t.Fatalf("%s keeps state after unstaging: %v", p.node, dirs)
			}
		}
	})
}

func writeFileSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if serr := f.Sync(); err == nil {
		err = serr
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
