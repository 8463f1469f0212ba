package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	mount "k8s.io/mount-utils"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/csi/attach"
)

// node is the CSI node service: NodeStage attaches a published volume as a
// local block device (an attach process, see package attach), formats it
// when it holds no file system (blkid first: a device with data is never
// formatted) and mounts it at the staging path; NodePublish bind-mounts it
// (or the device itself, for raw block volumes) where the pod wants it.
type node struct {
	csipb.UnimplementedNodeServer
	d *Driver
}

// NodeGetCapabilities lists what the node service does.
func (n node) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	var caps []*csipb.NodeServiceCapability
	for _, t := range []csipb.NodeServiceCapability_RPC_Type{
		csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csipb.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	} {
		caps = append(caps, &csipb.NodeServiceCapability{Type: &csipb.NodeServiceCapability_Rpc{
			Rpc: &csipb.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeGetInfo names the node and its topology.
func (n node) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	resp := &csipb.NodeGetInfoResponse{NodeId: n.d.cfg.NodeID}
	if len(n.d.cfg.Topology) > 0 {
		segs := map[string]string{}
		for k, v := range n.d.cfg.Topology {
			segs[TopologyPrefix+k] = v
		}
		resp.AccessibleTopology = &csipb.Topology{Segments: segs}
	}
	return resp, nil
}

// NodeStageVolume attaches the volume and, for a mount volume, mounts its
// file system at the staging path.
func (n node) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	id, staging, vc := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "staging target path is required")
	case vc == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is required")
	}
	if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
		return nil, err
	}
	readOnly := req.GetPublishContext()[publishReadOnly] == "true" || readerOnly(vc)
	st := &stageRecord{Volume: id, StagingPath: staging, Block: vc.GetBlock() != nil, ReadOnly: readOnly}
	if m := vc.GetMount(); m != nil {
		st.FsType, st.MountFlags = m.GetFsType(), m.GetMountFlags()
		if st.FsType == "" {
			st.FsType = n.d.cfg.DefaultFsType
		}
	}
	defer n.d.lockVolume(id)()
	rec, err := n.attachment(ctx, st)
	if err != nil {
		return nil, err
	}
	if st.Block {
		return &csipb.NodeStageVolumeResponse{}, nil
	}
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "create staging path %s: %v", staging, err)
	}
	if mounted, err := n.d.mounter.IsMountPoint(staging); err != nil {
		return nil, status.Errorf(codes.Internal, "staging path %s: %v", staging, err)
	} else if mounted {
		return &csipb.NodeStageVolumeResponse{}, nil
	}
	opts := append([]string{}, st.MountFlags...)
	if readOnly {
		opts = append(opts, "ro")
	}
	if err := n.d.mounter.FormatAndMount(rec.Device, staging, st.FsType, opts); err != nil {
		return nil, status.Errorf(codes.Internal, "format and mount %s (volume %q) at %s: %v", rec.Device, id, staging, err)
	}
	n.d.log.Info("volume staged", "volume", id, "device", rec.Device, "staging", staging, "fs", st.FsType, "read_only", readOnly)
	return &csipb.NodeStageVolumeResponse{}, nil
}

// attachment returns the volume's running attachment, starting one if
// there is none; ALREADY_EXISTS when it is staged elsewhere or differently.
func (n node) attachment(ctx context.Context, st *stageRecord) (*attach.Record, error) {
	dir := n.d.volumeDir(st.Volume)
	if old, err := readStage(dir); err == nil {
		if old.StagingPath != st.StagingPath || old.Block != st.Block || old.ReadOnly != st.ReadOnly || (!st.Block && old.FsType != st.FsType) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q is already staged at %s (block %t, read-only %t, fs %q)",
				st.Volume, old.StagingPath, old.Block, old.ReadOnly, old.FsType)
		}
		rec, err := attach.ReadRecord(dir)
		if err == nil && rec.Alive() {
			if rec.Device == "" {
				// An iscsi attach records its session before it logs in.
				return nil, status.Errorf(codes.Unavailable, "the attach process of volume %q (pid %d) is still attaching it", st.Volume, rec.Pid)
			}
			return rec, nil
		}
		// The attach process is gone. The kernel may still have its nbd
		// device or iscsi session, holding the IO of the pods on it: a
		// new attach process takes it over.
		if rec != nil && rec.Reattachable() == nil {
			now, err := n.d.takeOver(ctx, rec)
			if err != nil {
				return nil, status.Errorf(codes.Unavailable, "%v", err)
			}
			return now, nil
		}
		// After a reboot nothing of it is left but its records: attach
		// again. Its file system still mounted means pods still hold the
		// dead device: that cannot be repaired under them.
		if !st.Block {
			if mounted, _ := n.d.mounter.IsMountPoint(st.StagingPath); mounted {
				return nil, status.Errorf(codes.FailedPrecondition,
					"the attach process of volume %q is gone and its file system is still mounted at %s: stop the pods using it so that it is unstaged, then stage it again",
					st.Volume, st.StagingPath)
			}
		}
		if rec != nil {
			if err := rec.Stop(ctx); err != nil {
				return nil, status.Errorf(codes.Internal, "clean up the earlier attach of %q: %v", st.Volume, err)
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	// Say NOT_FOUND or FAILED_PRECONDITION before starting a process.
	cctx, cancel := n.d.callCtx(ctx)
	defer cancel()
	sv, err := n.d.mds.Volumes().StatVolume(cctx, &mdspb.StatVolumeRequest{Name: st.Volume})
	if err != nil {
		return nil, mdsErr(fmt.Sprintf("volume %q", st.Volume), err)
	}
	if !publishedTo(sv.Volume, n.d.cfg.NodeID, !st.ReadOnly) {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is not published to node %q%s", st.Volume, n.d.cfg.NodeID,
			map[bool]string{true: "", false: " for writing"}[st.ReadOnly])
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if err := writeStage(dir, st); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	actx, cancel := context.WithTimeout(ctx, attachTimeout)
	defer cancel()
	rec, err := attach.Start(actx, n.d.exe, n.d.attachSpec(st.Volume, dir, n.d.cfg.Attach, st.ReadOnly))
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	return rec, nil
}

// NodeUnstageVolume unmounts the staging path and detaches the volume.
// Unstaging what is not staged succeeds.
func (n node) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := required("volume id", id, "staging target path", staging); err != nil {
		return nil, err
	}
	defer n.d.lockVolume(id)()
	if rec, err := attach.ReadRecord(n.d.volumeDir(id)); err == nil {
		if others := mountsOf(n.d.mounter, rec.Device, staging); len(others) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %q is still mounted at %s: unpublish it there first",
				id, strings.Join(others, ", "))
		}
	}
	if err := unmountIfMounted(n.d.mounter, staging); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if err := n.d.detach(ctx, id); errors.Is(err, attach.ErrDeviceBusy) {
		return nil, status.Errorf(codes.FailedPrecondition, "%v: unpublish it everywhere first", err)
	} else if err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	n.d.log.Info("volume unstaged", "volume", id, "staging", staging)
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged file system (or, for a block
// volume, the device) at the target path.
func (n node) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	id, target, staging, vc := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target path is required")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "staging target path is required (the volume is staged first)")
	case vc == nil:
		return nil, status.Error(codes.InvalidArgument, "volume capability is required")
	}
	if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
		return nil, err
	}
	defer n.d.lockVolume(id)()
	dir := n.d.volumeDir(id)
	st, err := readStage(dir)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is not staged on this node", id)
	}
	if st.StagingPath != staging || st.Block != (vc.GetBlock() != nil) {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is staged at %s (block %t), not as asked", id, st.StagingPath, st.Block)
	}
	readOnly := req.GetReadonly() || st.ReadOnly
	opts := []string{"bind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	source := staging
	if st.Block && readOnly && !st.ReadOnly {
		// A read-only bind mount of a device node does not stop writes
		// through it.
		return nil, status.Errorf(codes.FailedPrecondition,
			"volume %q is a block volume attached for writing: a read-only publish needs it published read-only to the node (ControllerPublish readonly)", id)
	}
	if st.Block {
		rec, err := attach.ReadRecord(dir)
		if err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %q is not attached: %v", id, err)
		}
		source = rec.Device
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "create target file %s: %v", target, err)
		}
		f.Close()
	} else {
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "create target path %s: %v", target, err)
		}
		opts = append(opts, vc.GetMount().GetMountFlags()...)
	}
	if mounted, err := n.d.mounter.IsMountPoint(target); err != nil {
		return nil, status.Errorf(codes.Internal, "target path %s: %v", target, err)
	} else if mounted {
		if ro, ok := mountReadOnly(n.d.mounter, target); ok && ro != readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q is already published at %s with read-only %t", id, target, ro)
		}
		return &csipb.NodePublishVolumeResponse{}, nil
	}
	if err := n.d.mounter.Mount(source, target, "", opts); err != nil {
		return nil, status.Errorf(codes.Internal, "bind-mount %s at %s: %v", source, target, err)
	}
	n.d.log.Info("volume published on the node", "volume", id, "target", target, "block", st.Block)
	return &csipb.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target path and removes it.
func (n node) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := required("volume id", id, "target path", target); err != nil {
		return nil, err
	}
	defer n.d.lockVolume(id)()
	if err := unmountIfMounted(n.d.mounter, target); err != nil {
		return nil, status.Errorf(codes.Internal, "%v", err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "remove target path %s: %v", target, err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the file system's (or device's) usage.
func (n node) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := required("volume id", id, "volume path", path); err != nil {
		return nil, err
	}
	rec, err := attach.ReadRecord(n.d.volumeDir(id))
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q is not at %s: %v", id, path, err)
	}
	resp := &csipb.NodeGetVolumeStatsResponse{}
	if !rec.Alive() {
		n.d.log.Warn("volume stats asked of a volume whose attach process is gone", "volume", id, "pid", rec.Pid)
	}
	if !fi.IsDir() {
		size, err := deviceSize(path)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "%v", err)
		}
		resp.Usage = []*csipb.VolumeUsage{{Unit: csipb.VolumeUsage_BYTES, Total: size}}
		return resp, nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", path, err)
	}
	bs := fs.Bsize
	resp.Usage = []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: int64(fs.Blocks) * bs, Available: int64(fs.Bavail) * bs, Used: int64(fs.Blocks-fs.Bfree) * bs},
		{Unit: csipb.VolumeUsage_INODES, Total: int64(fs.Files), Available: int64(fs.Ffree), Used: int64(fs.Files - fs.Ffree)},
	}
	return resp, nil
}

// NodeGetVolumeHealth says whether a staged volume still answers: its
// attach process runs and reads its first sector.
func (n node) NodeGetVolumeHealth(ctx context.Context, req *csipb.NodeGetVolumeHealthRequest) (*csipb.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	rec, err := attach.ReadRecord(n.d.volumeDir(id))
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
	}
	health := &csipb.VolumeHealth{VolumeId: id}
	bad := func(reason, msg string) {
		health.HealthStatuses = append(health.HealthStatuses, &csipb.VolumeHealth_VolumeHealthEntry{
			Status: csipb.VolumeHealthErrorType_INACCESSIBLE, Reason: reason, Message: msg})
	}
	if !rec.Alive() {
		if rec.Reattachable() == nil {
			bad("AttachProcessGone", fmt.Sprintf("the attach process of volume %q (pid %d) is gone: the kernel holds the IO of %s until the node takes the device over with a new one",
				id, rec.Pid, rec.Device))
		} else {
			bad("AttachProcessGone", fmt.Sprintf("the attach process of volume %q (pid %d) is gone: device %s no longer reaches the volume; unstage and stage it again",
				id, rec.Pid, rec.Device))
		}
	} else if st, err := rec.Status(ctx); err != nil {
		bad("AttachProcessUnreachable", err.Error())
	} else if st.Error != "" {
		bad("VolumeUnreadable", "the volume does not answer reads: "+st.Error)
	}
	return &csipb.NodeGetVolumeHealthResponse{VolumeHealth: health}, nil
}

// NodeExpandVolume grows the device to the volume's new size and then the
// file system on it, online.
func (n node) NodeExpandVolume(ctx context.Context, req *csipb.NodeExpandVolumeRequest) (*csipb.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := required("volume id", id, "volume path", path); err != nil {
		return nil, err
	}
	defer n.d.lockVolume(id)()
	dir := n.d.volumeDir(id)
	rec, err := attach.ReadRecord(dir)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
	}
	st, err := readStage(dir)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
	}
	if _, err := os.Stat(path); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q is not at %s: %v", id, path, err)
	}
	size, err := rec.Resize(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "grow the device of %q: %v", id, err)
	}
	if want := req.GetCapacityRange().GetRequiredBytes(); want > size {
		return nil, status.Errorf(codes.OutOfRange, "volume %q is %d bytes, less than the %d asked: expand it through the controller first", id, size, want)
	}
	if !st.Block && !st.ReadOnly {
		if _, err := mount.NewResizeFs(n.d.exec).Resize(rec.Device, st.StagingPath); err != nil {
			return nil, status.Errorf(codes.Internal, "grow the file system of %q on %s: %v", id, rec.Device, err)
		}
	}
	n.d.log.Info("volume expanded on the node", "volume", id, "size", size)
	return &csipb.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// required refuses a request missing one of its fields, given as name,
// value pairs, with INVALID_ARGUMENT naming the first one missing.
func required(fields ...string) error {
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i+1] == "" {
			return status.Errorf(codes.InvalidArgument, "%s is required", fields[i])
		}
	}
	return nil
}

// publishedTo reports whether v is published to node (writable, if asked).
func publishedTo(v *mdspb.Volume, node string, writable bool) bool {
	for _, p := range v.GetPublications() {
		if p.Node == node && (!writable || !p.ReadOnly) {
			return true
		}
	}
	return false
}

// unmountIfMounted unmounts path when something is mounted there.
func unmountIfMounted(m mount.Interface, path string) error {
	mounted, err := m.IsMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil && !mount.IsCorruptedMnt(err) {
		return fmt.Errorf("check mount %s: %w", path, err)
	}
	if err == nil && !mounted {
		return nil
	}
	if err := m.Unmount(path); err != nil {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	return nil
}

// mountsOf lists where device is mounted, but for path.
func mountsOf(m mount.Interface, device, path string) []string {
	mps, err := m.List()
	if err != nil {
		return nil
	}
	var out []string
	for _, mp := range mps {
		if mp.Device == device && mp.Path != path {
			out = append(out, mp.Path)
		}
	}
	return out
}

// mountReadOnly reports whether the mount at path is read-only (ok false
// when path is not found among the mounts).
func mountReadOnly(m mount.Interface, path string) (ro, ok bool) {
	mps, err := m.List()
	if err != nil {
		return false, false
	}
	for i := len(mps) - 1; i >= 0; i-- { // the last mount at a path is the one in effect
		if mps[i].Path == path {
			return slices.Contains(mps[i].Opts, "ro"), true
		}
	}
	return false, false
}

// deviceSize is a block device's size in bytes.
func deviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	size, err := f.Seek(0, 2)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", path, err)
	}
	return size, nil
}
