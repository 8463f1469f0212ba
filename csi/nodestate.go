package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/csi/attach"
)

// TopologyPrefix prefixes the topology segments the node reports
// (--topology zone=a reports topology.csi.cairn.io/zone=a).
const TopologyPrefix = "topology.csi.cairn.io/"

// attachTimeout bounds the start of an attach process (opening the
// volume waits out the fencing of an earlier writer).
const attachTimeout = 2 * time.Minute

// stageFile records how a volume was staged, beside the attach process's
// record in the volume's state directory.
const stageFile = "stage.json"

// stageRecord is how a volume is staged on this node.
type stageRecord struct {
	Volume      string   `json:"volume"`
	StagingPath string   `json:"staging_path"`
	Block       bool     `json:"block"`
	FsType      string   `json:"fs_type,omitempty"`
	MountFlags  []string `json:"mount_flags,omitempty"`
	ReadOnly    bool     `json:"read_only"`
}

// volumeDir is a volume's state directory on this node, named by a hash of
// the volume id: ids may be long, and the directory holds a unix socket,
// whose path the kernel limits to 107 bytes. The records in it name the
// volume.
func (d *Driver) volumeDir(id string) string {
	sum := sha256.Sum256([]byte(id))
	return filepath.Join(d.cfg.StateDir, "volumes", hex.EncodeToString(sum[:10]))
}

func readStage(dir string) (*stageRecord, error) {
	b, err := os.ReadFile(filepath.Join(dir, stageFile))
	if err != nil {
		return nil, err
	}
	st := &stageRecord{}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("stage record in %s: %w", dir, err)
	}
	return st, nil
}

func writeStage(dir string, st *stageRecord) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	// Durable: after a reboot the record is what says how to stage again.
	if err := fsutil.WriteFileAtomic(filepath.Join(dir, stageFile), b, 0o600); err != nil {
		return fmt.Errorf("write stage record: %w", err)
	}
	return nil
}

// detach stops a volume's attach process (or cleans up after one that
// died) and removes its state directory; a volume not attached here is
// left as it is.
func (d *Driver) detach(ctx context.Context, id string) error {
	dir := d.volumeDir(id)
	rec, err := attach.ReadRecord(dir)
	switch {
	case err == nil:
		sctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		if err := rec.Stop(sctx); err != nil {
			return fmt.Errorf("detach volume %q: %w", id, err)
		}
	case !errors.Is(err, os.ErrNotExist):
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove the state of volume %q: %w", id, err)
	}
	return nil
}

// adopt looks at the volumes staged here before this process started: their
// attach processes run on, and are stopped at unstage. One that is gone
// leaves a fuse device broken until the volume is unstaged and staged
// again (logged here, reported by NodeGetVolumeHealth); an nbd device or
// iscsi session the kernel still holds is taken over (watchAttachments).
func (d *Driver) adopt() {
	entries, err := os.ReadDir(filepath.Join(d.cfg.StateDir, "volumes"))
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("cannot read the node's state", "err", err)
		}
		return
	}
	for _, e := range entries {
		dir := filepath.Join(d.cfg.StateDir, "volumes", e.Name())
		rec, err := attach.ReadRecord(dir)
		if err != nil {
			d.log.Warn("staged volume without an attach record", "dir", dir, "err", err)
			continue
		}
		switch {
		case rec.Alive():
			d.log.Info("volume still attached", "volume", rec.Volume, "device", rec.Device, "pid", rec.Pid)
		case rec.Reattachable() == nil:
			d.log.Warn("the attach process of a staged volume is gone; its device is held by the kernel until a new one takes it over",
				"volume", rec.Volume, "device", rec.Device, "pid", rec.Pid)
		default:
			d.log.Error("the attach process of a staged volume is gone: its device no longer reaches the volume until it is unstaged and staged again",
				"volume", rec.Volume, "device", rec.Device, "pid", rec.Pid)
		}
	}
}

// registerNode registers this node with the MDS, retrying until it
// succeeds or the driver stops: volumes are published only to registered
// nodes.
func (d *Driver) registerNode(ctx context.Context) {
	n := &mdspb.Node{Name: d.cfg.NodeID, Topology: d.cfg.Topology}
	for delay := time.Second; ; delay = min(2*delay, 30*time.Second) {
		cctx, cancel := d.callCtx(ctx)
		_, err := d.mds.Volumes().RegisterNode(cctx, &mdspb.RegisterNodeRequest{Node: n})
		cancel()
		if err == nil {
			d.log.Info("node registered with the MDS", "node", d.cfg.NodeID)
			return
		}
		d.log.Warn("cannot register the node with the MDS; retrying", "node", d.cfg.NodeID, "err", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
}
