// Package attach exposes a Cairn volume to a node's kernel as a block
// device, for the CSI node plugin.
//
// One attach process (cairn-csi attach) serves one volume: it opens the
// volume with the node's publication (client.Options.Node) and makes a
// block device of it in one of three ways (Spec.Attach):
//
//   - fuse: it serves the volume as a one-file FUSE file system in its
//     state directory and backs a loop device with that file. Reads and
//     writes of the loop device reach the volume directly (the file is
//     opened for direct IO: no second page cache), a flush of the loop
//     device is a Flush of the volume, and a discard unmaps. It needs only
//     FUSE and loop devices. It is its own FUSE file system rather than
//     nbdfuse over NBD because a FUSE file can grow while attached:
//     nbdfuse fixes the size when it connects, and a loop device cannot be
//     moved to a new file. The device dies with the process.
//   - nbd: it serves the volume with Cairn's NBD server (package nbd, the
//     transmission phase only) on one end of a socket pair and hands the
//     other end to the kernel's nbd driver through its generic netlink
//     family (package kernelnbd), as rbd-nbd and curve-nbd do: /dev/nbdN.
//     The device is the kernel's and outlives the process: when the process
//     dies, the kernel holds the device's IO for Spec.ReattachTimeout, and a
//     new attach process takes the device over (Spec.Takeover, NBD_CMD_
//     RECONFIGURE with a new socket). Growing is NBD_CMD_RECONFIGURE with the
//     new size (Linux 5.3 and later).
//   - iscsi: it serves the volume with Cairn's iSCSI target (package iscsi)
//     on a portal of the loopback, 127.0.0.1:PORT, as a target of its own
//     with random mutual CHAP secrets, and logs the node's kernel initiator
//     in with open-iscsi's iscsiadm: /dev/sdX. The session is the kernel's
//     and outlives the process: the kernel queues the disk's IO for
//     Spec.ReattachTimeout (node.session.timeo.replacement_timeout) while
//     iscsid logs in again, and a new attach process takes the session
//     over by serving the same portal, target name and secrets (from the
//     record). Growing is a unit attention (CAPACITY DATA HAS CHANGED)
//     and a rescan of the disk.
//
// The process runs in its own session, apart from the node plugin, so a
// restart of the plugin leaves mounted volumes working: the plugin finds
// the process again from the record it left in the state directory
// (Record) and stops it when the volume is unstaged. A small control socket
// in the same directory lets the plugin grow the device after the volume
// was extended and ask whether the volume still answers.
package attach
