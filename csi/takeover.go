package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"cairn.io/cairn/csi/attach"
)

// An nbd- or iscsi-attached volume outlives its attach process: the kernel
// keeps the device and holds its IO for the reattach timeout. The node
// takes such a device over with a new attach process (nbd:
// NBD_CMD_RECONFIGURE with a new socket; iscsi: the target served again
// on the same portal, which the kernel's session logs in to again) as
// soon as it sees the process gone: when it starts (after its container
// restarted, which killed every attach process in it), every
// watchInterval while it runs, and when the volume is staged again.

// watchInterval is how often the node looks for nbd and iscsi attachments
// whose attach process is gone.
const watchInterval = 10 * time.Second

// attachSpec is the spec of an attach process of volume in dir.
func (d *Driver) attachSpec(volume, dir, mode string, readOnly bool) attach.Spec {
	spec := attach.Spec{
		Volume: volume, Node: d.cfg.NodeID, MDSAddrs: d.cfg.MDSAddrs, ReadOnly: readOnly, Dir: dir,
		TLS: d.tlsFiles(), Attach: mode,
	}
	switch mode {
	case attach.AttachNBD:
		spec.ReattachTimeout = d.cfg.ReattachTimeout
	case attach.AttachISCSI:
		spec.ReattachTimeout = d.cfg.ReattachTimeout
		spec.ISCSIAdm = d.cfg.ISCSIAdm
	}
	return spec
}

// takeOver starts an attach process that takes over the device of rec
// (nbd, iscsi), whose process is gone; the caller holds the volume's lock
// and checked rec.Reattachable.
func (d *Driver) takeOver(ctx context.Context, rec *attach.Record) (*attach.Record, error) {
	spec := d.attachSpec(rec.Volume, rec.Dir, rec.Attach, rec.ReadOnly)
	spec.Takeover = attach.TakeoverOf(rec)
	actx, cancel := context.WithTimeout(ctx, attachTimeout)
	defer cancel()
	d.log.Info("the attach process of a volume is gone; taking its device over", "volume", rec.Volume, "attach", rec.Attach,
		"device", rec.Device, "pid", rec.Pid)
	now, err := attach.Start(actx, d.exe, spec)
	if err != nil {
		return nil, fmt.Errorf("take over %s of volume %q: %w", rec.Device, rec.Volume, err)
	}
	d.log.Info("device taken over", "volume", rec.Volume, "attach", rec.Attach, "device", now.Device, "pid", now.Pid)
	return now, nil
}

// watchAttachments takes over the nbd devices and iscsi sessions of
// attach processes that are gone, at start and every watchInterval, until
// ctx ends.
func (d *Driver) watchAttachments(ctx context.Context) {
	defer close(d.watchDone)
	reported := map[string]string{} // dir -> why it cannot be taken over, logged once
	for {
		d.takeOverGone(ctx, reported)
		select {
		case <-ctx.Done():
			return
		case <-time.After(watchInterval):
		}
	}
}

// takeOverGone makes one pass of watchAttachments.
func (d *Driver) takeOverGone(ctx context.Context, reported map[string]string) {
	entries, err := os.ReadDir(filepath.Join(d.cfg.StateDir, "volumes"))
	if err != nil {
		return
	}
	for _, e := range entries {
		if ctx.Err() != nil {
			return
		}
		dir := filepath.Join(d.cfg.StateDir, "volumes", e.Name())
		rec, err := attach.ReadRecord(dir)
		if err != nil || !rec.OutlivesProcess() || rec.Alive() {
			delete(reported, dir)
			continue
		}
		func() {
			defer d.lockVolume(rec.Volume)()
			// Under the lock: unstaged, or taken over, meanwhile?
			rec, err := attach.ReadRecord(dir)
			if err != nil || rec.Alive() {
				return
			}
			if why := rec.Reattachable(); why != nil {
				if reported[dir] != why.Error() {
					reported[dir] = why.Error()
					d.log.Error("the attach process of a staged volume is gone and its device cannot be taken over: the volume fails IO until it is unstaged and staged again",
						"volume", rec.Volume, "device", rec.Device, "why", why)
				}
				return
			}
			if _, err := d.takeOver(ctx, rec); err != nil && !errors.Is(ctx.Err(), context.Canceled) {
				d.log.Error("taking over a device failed; trying again", "volume", rec.Volume, "device", rec.Device, "err", err,
					"retry_in", watchInterval)
			}
		}()
	}
}
