package csi_test

import (
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"cairn.io/cairn/csi"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/test/cluster"
)

// TestSanity runs the Kubernetes CSI sanity suite (csi-test's sanity
// package) against the driver in mode all on a real cluster: controller
// and node, attaching every volume it stages. Tests of capabilities the
// driver does not advertise (snapshots, cloning) are skipped by the suite.
func TestSanity(t *testing.T) {
	needNode(t)
	testtool.Need(t, "mkfs.xfs", "xfs_growfs")
	c := cluster.Start(t, cluster.Options{})
	// xfs: the suite grows a mounted volume, and ext4 grows online only
	// with CAP_SYS_RESOURCE, which some sandboxes drop.
	n := startNode(t, c, "sanity-node", func(cfg *csi.Config) { cfg.DefaultFsType = "xfs" })
	base := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = n.sock
	cfg.TargetPath = filepath.Join(base, "target")
	cfg.StagingPath = filepath.Join(base, "staging")
	// Whole segments (the driver rounds up to them), and at least the
	// 300 MiB mkfs.xfs needs.
	cfg.TestVolumeSize = 5 * seg
	cfg.TestVolumeExpandSize = 6 * seg
	cfg.IdempotentCount = 2
	sanity.Test(t, cfg)
}
