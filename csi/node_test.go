package csi_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/csi"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/test/cluster"
	"cairn.io/cairn/test/faultfs"
)

// csiBuild builds cairn-csi once: the node runs it as its attach
// processes.
var csiBuild = testtool.NewBuilder("cairn.io/cairn/cmd/cairn-csi")

// TestMain removes the cairn-csi binary csiBuild built, if any.
func TestMain(m *testing.M) {
	code := m.Run()
	csiBuild.Remove()
	os.Exit(code)
}

func csiBinary(t *testing.T) string { return csiBuild.Path(t) }

// needNode skips (or, in CI, fails) a test of the node service where it
// cannot run: it needs root, FUSE and loop devices.
func needNode(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("attaches volumes; not in -short mode")
	}
	if os.Geteuid() != 0 {
		if testtool.InCI() {
			t.Fatal("the CSI node tests need root (mount, loop devices) in CI")
		}
		t.Skip("the CSI node tests need root (mount, loop devices)")
	}
	faultfs.RequireFUSE(t)
	testtool.Need(t, "losetup", "blkid")
}

// nodeEnv is one node's driver (mode all) against a shared cluster.
type nodeEnv struct {
	id    string
	sock  string
	ctl   csipb.ControllerClient
	node  csipb.NodeClient
	state string
	stop  func()
}

func startNode(t *testing.T, c *cluster.Cluster, id string, tweak ...func(*csi.Config)) *nodeEnv {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	state := filepath.Join(dir, "state")
	cfg := csi.Config{
		Endpoint: "unix://" + sock, MDSAddrs: []string{c.MDS.Addr()}, Mode: csi.ModeAll, NodeID: id,
		StateDir: state, Executable: csiBinary(t), Version: "test", Logger: testlog.New(t).With("node", id),
		Topology: map[string]string{"zone": "z-" + id},
	}
	for _, f := range tweak {
		f(&cfg)
	}
	d, err := csi.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			conn.Close()
			d.Stop()
		}
	}
	t.Cleanup(stop)
	// Volumes are published only to registered nodes: wait for it.
	soon.Succeeds(t, 30*time.Second, func() error {
		ls, err := c.Conn.Volumes().ListNodes(context.Background(), &mdspb.ListNodesRequest{})
		if err != nil {
			return err
		}
		for _, n := range ls.Nodes {
			if n.Name == id {
				return nil
			}
		}
		return fmt.Errorf("node %s not registered yet", id)
	})
	return &nodeEnv{id: id, sock: sock, ctl: csipb.NewControllerClient(conn), node: csipb.NewNodeClient(conn), state: state, stop: stop}
}

// stage publishes, stages and node-publishes a mount volume on n and
// returns where the pod would see it.
func (n *nodeEnv) stage(t *testing.T, ctx context.Context, vol, base string, mountFlags ...string) (staging, target string) {
	t.Helper()
	vc := mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, testFs)
	vc.GetMount().MountFlags = mountFlags
	pub, err := n.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: vol, NodeId: n.id, VolumeCapability: vc})
	if err != nil {
		t.Fatalf("publish %s to %s: %v", vol, n.id, err)
	}
	staging, target = filepath.Join(base, "staging-"+n.id), filepath.Join(base, "target-"+n.id)
	// Whatever happens to the test, nothing stays mounted or attached
	// (this runs before the driver and the cluster stop).
	t.Cleanup(func() {
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		_, _ = n.node.NodeUnpublishVolume(cctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
		_, _ = n.node.NodeUnstageVolume(cctx, &csipb.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging})
	})
	if _, err := n.node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{
		VolumeId: vol, StagingTargetPath: staging, VolumeCapability: vc, PublishContext: pub.PublishContext,
	}); err != nil {
		t.Fatalf("stage %s on %s: %v", vol, n.id, err)
	}
	if _, err := n.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
		VolumeId: vol, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc, PublishContext: pub.PublishContext,
	}); err != nil {
		t.Fatalf("node-publish %s on %s: %v", vol, n.id, err)
	}
	return staging, target
}

// unstage undoes stage, leaving the volume published.
func (n *nodeEnv) unstage(t *testing.T, ctx context.Context, vol, staging, target string) {
	t.Helper()
	if _, err := n.node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target}); err != nil {
		t.Fatalf("node-unpublish: %v", err)
	}
	if _, err := n.node.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: vol, StagingTargetPath: staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
}

func writeSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// testFs is the file system of the node tests: xfs grows online with the
// capabilities a test has here (ext4's online resize needs
// CAP_SYS_RESOURCE, which some sandboxes drop).
const testFs = "xfs"

func TestNodeStagesMovesExpandsAndFences(t *testing.T) {
	needNode(t)
	testtool.Need(t, "mkfs.xfs", "xfs_growfs")
	c := cluster.Start(t, cluster.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	a, b := startNode(t, c, "node-a"), startNode(t, c, "node-b")
	base := t.TempDir()

	info, err := a.node.NodeGetInfo(ctx, &csipb.NodeGetInfoRequest{})
	if err != nil || info.NodeId != "node-a" || info.AccessibleTopology.GetSegments()[csi.TopologyPrefix+"zone"] != "z-node-a" {
		t.Fatalf("node info %v, %v", info, err)
	}
	vc := mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, testFs)
	if _, err := a.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name: "pvc-1", CapacityRange: &csipb.CapacityRange{RequiredBytes: 5 * seg}, VolumeCapabilities: []*csipb.VolumeCapability{vc},
	}); err != nil {
		t.Fatal(err)
	}
	// Staging on a node the volume is not published to is refused.
	_, err = b.node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "pvc-1", StagingTargetPath: filepath.Join(base, "x"), VolumeCapability: vc})
	wantCode(t, "stage without publish", err, codes.FailedPrecondition, "not published")

	// Node a: format, mount, write files.
	stagingA, targetA := a.stage(t, ctx, "pvc-1", base)
	files := map[string][]byte{}
	for _, name := range []string{"one", "two", "three"} {
		data := make([]byte, 300<<10)
		_, _ = rand.Read(data)
		files[name] = data
		if err := writeSynced(filepath.Join(targetA, name), data); err != nil {
			t.Fatal(err)
		}
	}
	stats, err := a.node.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "pvc-1", VolumePath: targetA})
	if err != nil || len(stats.Usage) != 2 || stats.Usage[0].Total < 4*seg || stats.Usage[0].Used < 900<<10 {
		t.Fatalf("stats %v, %v", stats, err)
	}
	// Deleting a published volume is refused.
	_, err = a.ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: "pvc-1"})
	wantCode(t, "delete while published", err, codes.FailedPrecondition, "published")

	// Expand online: the controller grows the volume, the node the device
	// and the file system, while it stays mounted.
	exp, err := a.ctl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{
		VolumeId: "pvc-1", CapacityRange: &csipb.CapacityRange{RequiredBytes: 7 * seg}, VolumeCapability: vc})
	if err != nil || exp.CapacityBytes != 7*seg || !exp.NodeExpansionRequired {
		t.Fatalf("controller expand %v, %v", exp, err)
	}
	nexp, err := a.node.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{
		VolumeId: "pvc-1", VolumePath: targetA, CapacityRange: &csipb.CapacityRange{RequiredBytes: 7 * seg}})
	if err != nil || nexp.CapacityBytes != 7*seg {
		t.Fatalf("node expand %v, %v", nexp, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(targetA, &fs); err != nil {
		t.Fatal(err)
	}
	if got := int64(fs.Blocks) * fs.Bsize; got <= 5*seg {
		t.Fatalf("file system is %d bytes after expanding the volume from %d to %d", got, 5*seg, 7*seg)
	}
	big := make([]byte, 8<<20)
	_, _ = rand.Read(big)
	if err := writeSynced(filepath.Join(targetA, "big"), big); err != nil {
		t.Fatalf("write after growing: %v", err)
	}
	files["big"] = big

	// Publishing again at the same path is a no-op; read-only there is
	// ALREADY_EXISTS; unstaging while published is refused and changes
	// nothing.
	if _, err := a.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "pvc-1", StagingTargetPath: stagingA,
		TargetPath: targetA, VolumeCapability: vc}); err != nil {
		t.Fatalf("publish again: %v", err)
	}
	_, err = a.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "pvc-1", StagingTargetPath: stagingA,
		TargetPath: targetA, VolumeCapability: vc, Readonly: true})
	wantCode(t, "publish read-only over a writable publish", err, codes.AlreadyExists, "read-only false")
	_, err = a.node.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "pvc-1", StagingTargetPath: stagingA})
	wantCode(t, "unstage while published", err, codes.FailedPrecondition, "still mounted at "+targetA)
	if err := writeSynced(filepath.Join(targetA, "after-refusal"), []byte("still attached")); err != nil {
		t.Fatalf("the refused unstage changed something: %v", err)
	}

	// Move to node b the way Kubernetes does: unstage, unpublish, publish
	// elsewhere; b reads back every byte.
	a.unstage(t, ctx, "pvc-1", stagingA, targetA)
	if _, err := os.Stat(targetA); !os.IsNotExist(err) {
		t.Fatalf("target path left behind: %v", err)
	}
	if _, err := a.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: "pvc-1", NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	stagingB, targetB := b.stage(t, ctx, "pvc-1", base)
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(targetB, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s on node b: %d bytes, %v; want the %d bytes written on node a", name, len(got), err, len(want))
		}
	}

	// Fencing: node b is cut off while the volume stays attached there (its
	// kubelet unreachable); the volume is unpublished from b (Kubernetes
	// force-detaches it) and published to a. Node b's next write fails;
	// node a's succeed.
	if _, err := b.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: "pvc-1", NodeId: "node-b"}); err != nil {
		t.Fatal(err)
	}
	// The unpublish fenced node b before it returned.
	late := bytes.Repeat([]byte("late write from node b "), 4096)
	if err := writeSynced(filepath.Join(targetB, "late"), late); err == nil {
		t.Fatal("node b wrote after it was unpublished")
	}
	// Both nodes share one kernel here, and XFS refuses a second mount of
	// a file system it has mounted (same UUID) unless told.
	stagingA, targetA = a.stage(t, ctx, "pvc-1", base, "nouuid")
	fresh := bytes.Repeat([]byte("node a owns the volume "), 4096)
	if err := writeSynced(filepath.Join(targetA, "fresh"), fresh); err != nil {
		t.Fatalf("node a after the move: %v", err)
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(targetA, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s on node a after b was fenced: %d bytes, %v", name, len(got), err)
		}
	}
	if _, err := os.Stat(filepath.Join(targetA, "late")); !os.IsNotExist(err) {
		t.Fatalf("node b's fenced write is visible on node a: %v", err)
	}
	// Node b cleans up without its volume answering.
	b.unstage(t, ctx, "pvc-1", stagingB, targetB)
	a.unstage(t, ctx, "pvc-1", stagingA, targetA)
	if _, err := a.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: "pvc-1", NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: "pvc-1"}); err != nil {
		t.Fatal(err)
	}
}

func TestNodeRestartKeepsVolumesMounted(t *testing.T) {
	c, a, ctx, base, _ := oneNodeVolume(t, "pvc-r")
	staging, target := a.stage(t, ctx, "pvc-r", base)
	before := bytes.Repeat([]byte("before the restart "), 1<<14)
	if err := writeSynced(filepath.Join(target, "before"), before); err != nil {
		t.Fatal(err)
	}
	// The plugin stops (a crash or an upgrade) and starts again on the same
	// state: the mounted volume kept working all along.
	a.stop()
	after := bytes.Repeat([]byte("while the plugin is down "), 1<<14)
	if err := writeSynced(filepath.Join(target, "down"), after); err != nil {
		t.Fatalf("write while the node plugin is down: %v", err)
	}
	a2 := restartNode(t, c, a)
	health, err := a2.node.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: "pvc-r"})
	if err != nil || len(health.VolumeHealth.GetHealthStatuses()) != 0 {
		t.Fatalf("health after the restart: %v, %v", health, err)
	}
	for name, want := range map[string][]byte{"before": before, "down": after} {
		if got, err := os.ReadFile(filepath.Join(target, name)); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes, %v", name, len(got), err)
		}
	}
	// The restarted plugin unstages what the first one staged, and stops
	// its attach process.
	rec := readRecord(t, a2, "pvc-r")
	a2.unstage(t, ctx, "pvc-r", staging, target)
	if _, err := os.Stat("/proc/" + strconv.Itoa(rec.Pid)); !os.IsNotExist(err) {
		t.Fatalf("attach process %d still runs after unstage", rec.Pid)
	}
	if out, _ := exec.Command("losetup", "--list", "--noheadings", "--output", "NAME").Output(); bytes.Contains(out, []byte(rec.Device+"\n")) {
		t.Fatalf("loop device %s still attached", rec.Device)
	}
	// An unknown volume's health is NOT_FOUND.
	_, err = a2.node.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: "pvc-r"})
	wantCode(t, "health of an unstaged volume", err, codes.NotFound, "not staged")
}

func TestNodeBlockVolumesAndReaders(t *testing.T) {
	needNode(t)
	c := cluster.Start(t, cluster.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	base := t.TempDir()
	a, b := startNode(t, c, "node-a"), startNode(t, c, "node-b")
	rw := blockCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	if _, err := a.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name: "pvc-b", CapacityRange: &csipb.CapacityRange{RequiredBytes: seg}, VolumeCapabilities: []*csipb.VolumeCapability{rw},
	}); err != nil {
		t.Fatal(err)
	}
	attachBlock := func(n *nodeEnv, vc *csipb.VolumeCapability, readOnly bool) string {
		pub, err := n.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: "pvc-b", NodeId: n.id, VolumeCapability: vc, Readonly: readOnly})
		if err != nil {
			t.Fatalf("publish to %s: %v", n.id, err)
		}
		staging, target := filepath.Join(base, "bstaging-"+n.id), filepath.Join(base, "bdev-"+n.id)
		t.Cleanup(func() {
			cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			_, _ = n.node.NodeUnpublishVolume(cctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "pvc-b", TargetPath: target})
			_, _ = n.node.NodeUnstageVolume(cctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "pvc-b", StagingTargetPath: staging})
		})
		if _, err := n.node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "pvc-b", StagingTargetPath: staging,
			VolumeCapability: vc, PublishContext: pub.PublishContext}); err != nil {
			t.Fatalf("stage on %s: %v", n.id, err)
		}
		if _, err := n.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "pvc-b", StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: vc, PublishContext: pub.PublishContext, Readonly: readOnly}); err != nil {
			t.Fatalf("node-publish on %s: %v", n.id, err)
		}
		return target
	}
	dev := attachBlock(a, rw, false)
	data := make([]byte, 1<<20)
	_, _ = rand.Read(data)
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	stats, err := a.node.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "pvc-b", VolumePath: dev})
	if err != nil || len(stats.Usage) != 1 || stats.Usage[0].Total != seg {
		t.Fatalf("block stats %v, %v", stats, err)
	}
	// A read-only bind of a device attached for writing would not stop
	// writes: refused.
	_, err = a.node.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: "pvc-b", StagingTargetPath: filepath.Join(base, "bstaging-node-a"),
		TargetPath: filepath.Join(base, "bdev-ro"), VolumeCapability: rw, Readonly: true})
	wantCode(t, "read-only publish of a writable block attach", err, codes.FailedPrecondition, "published read-only")
	// A reader elsewhere is refused while a writes.
	ro := blockCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)
	_, err = b.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: "pvc-b", NodeId: "node-b", VolumeCapability: ro, Readonly: true})
	wantCode(t, "reader while a writer holds it", err, codes.FailedPrecondition, "published for writing")

	// Then read-only on both nodes at once.
	if _, err := a.node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "pvc-b", TargetPath: dev}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.node.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "pvc-b", StagingTargetPath: filepath.Join(base, "bstaging-node-a")}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: "pvc-b", NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*nodeEnv{a, b} {
		dev := attachBlock(n, ro, true)
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if _, err := f.ReadAt(got, 3<<20); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read on %s: %v (equal %t)", n.id, err, bytes.Equal(got, data))
		}
		f.Close()
		if w, err := os.OpenFile(dev, os.O_WRONLY, 0); err == nil {
			_, werr := w.WriteAt(data[:4096], 0)
			serr := w.Sync()
			w.Close()
			if werr == nil && serr == nil {
				t.Fatalf("a read-only attach on %s took a write", n.id)
			}
		}
	}
}

// oneNodeVolume starts a cluster and one node (mode all) and creates an
// xfs-sized volume named name, for the node tests that need no second node.
func oneNodeVolume(t *testing.T, name string) (*cluster.Cluster, *nodeEnv, context.Context, string, *csipb.VolumeCapability) {
	t.Helper()
	needNode(t)
	testtool.Need(t, "mkfs.xfs")
	c := cluster.Start(t, cluster.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	a := startNode(t, c, "node-a")
	vc := mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, testFs)
	if _, err := a.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: 5 * seg}, VolumeCapabilities: []*csipb.VolumeCapability{vc},
	}); err != nil {
		t.Fatal(err)
	}
	return c, a, ctx, t.TempDir(), vc
}

// restartNode starts a node's driver again on the same state directory;
// old then speaks to the new driver.
func restartNode(t *testing.T, c *cluster.Cluster, old *nodeEnv, tweak ...func(*csi.Config)) *nodeEnv {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	cfg := csi.Config{
		Endpoint: "unix://" + sock, MDSAddrs: []string{c.MDS.Addr()}, Mode: csi.ModeAll, NodeID: old.id,
		StateDir: old.state, Executable: csiBinary(t), Version: "test", Logger: testlog.New(t).With("node", old.id),
	}
	for _, f := range tweak {
		f(&cfg)
	}
	d, err := csi.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); d.Stop() })
	old.ctl, old.node, old.stop = csipb.NewControllerClient(conn), csipb.NewNodeClient(conn), func() {}
	return old
}

// readRecord reads the attach record of a volume staged on n.
func readRecord(t *testing.T, n *nodeEnv, vol string) *attach.Record {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(n.state, "volumes", "*"))
	for _, dir := range dirs {
		if rec, err := attach.ReadRecord(dir); err == nil && rec.Volume == vol {
			return rec
		}
	}
	t.Fatalf("no attach record of %s on %s", vol, n.id)
	return nil
}

func TestNodeStageAfterAttachProcessDied(t *testing.T) {
	_, a, ctx, base, vc := oneNodeVolume(t, "pvc-d")
	staging, target := a.stage(t, ctx, "pvc-d", base)
	data := bytes.Repeat([]byte("survives the attach process "), 1<<12)
	if err := writeSynced(filepath.Join(target, "f"), data); err != nil {
		t.Fatal(err)
	}
	rec := readRecord(t, a, "pvc-d")
	if err := unix.Kill(rec.Pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if rec.Alive() {
			return fmt.Errorf("attach process %d still alive", rec.Pid)
		}
		return nil
	})
	health, err := a.node.NodeGetVolumeHealth(ctx, &csipb.NodeGetVolumeHealthRequest{VolumeId: "pvc-d"})
	if err != nil || len(health.VolumeHealth.GetHealthStatuses()) != 1 ||
		health.VolumeHealth.HealthStatuses[0].Status != csipb.VolumeHealthErrorType_INACCESSIBLE {
		t.Fatalf("health of a volume whose attach process died: %v, %v", health, err)
	}
	// Its file system is still mounted: staging again cannot repair it.
	_, err = a.node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: "pvc-d", StagingTargetPath: staging, VolumeCapability: vc})
	wantCode(t, "stage over a dead attachment", err, codes.FailedPrecondition, "is gone")
	// What a reboot leaves: no mounts, no loop device, the records. The
	// pods' mounts go first (lazily: the device under them is dead).
	for _, p := range []string{target, staging} {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
	}
	if err := rec.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	// The dead attachment's loop device is freed (once the lazily
	// unmounted file system lets go of it).
	soon.Succeeds(t, 30*time.Second, func() error {
		if _, err := os.Stat(filepath.Join("/sys/block", filepath.Base(rec.Device), "loop", "backing_file")); err == nil {
			return fmt.Errorf("%s is still bound", rec.Device)
		}
		return nil
	})
	staging, target = a.stage(t, ctx, "pvc-d", base)
	if got, err := os.ReadFile(filepath.Join(target, "f")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after attaching again: %d bytes, %v", len(got), err)
	}
	if now := readRecord(t, a, "pvc-d"); now.Pid == rec.Pid || !now.Alive() {
		t.Fatalf("no new attach process: %+v", now)
	}
	a.unstage(t, ctx, "pvc-d", staging, target)
}
