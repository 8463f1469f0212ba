// Package csi is Cairn's Container Storage Interface driver (csi.cairn.io):
// what Kubernetes calls to create, grow, list and delete the volumes behind
// PersistentVolumeClaims.
//
// The driver serves the CSI gRPC services on a unix socket
// (cmd/cairn-csi). Its controller service maps every call onto the MDS's
// volume service: a CSI volume is a Cairn volume, its id the volume's name
// (the name Kubernetes gave the claim's volume, so CreateVolume is
// idempotent by name); capacities are rounded up to whole segments and
// reported back; the StorageClass parameter "pool" names the logical pool.
// Errors carry the codes the CSI specification names: INVALID_ARGUMENT for
// malformed requests and unsupported capabilities, OUT_OF_RANGE for a
// capacity that cannot be met, ALREADY_EXISTS for a name taken with an
// incompatible size, NOT_FOUND for unknown volumes, FAILED_PRECONDITION for
// a volume still open for writing, ABORTED for a bad pagination token; a
// refused call changes nothing.
//
// ControllerPublish records a publication in the MDS, which enforces it
// where writers are admitted: a writable publication makes its node the
// volume's only writer, and unpublishing it (or publishing the volume to
// another node once the old one's session expired) fences the old node
// before the call returns.
//
// The node service attaches each staged volume through an attach process
// of its own (package attach: a loop device over a FUSE file), formats an
// empty device (blkid first), mounts it at the staging path and bind-mounts
// it for each pod (or the device itself, for block volumes); it grows file
// systems online, reports usage and health, and keeps its state in a
// directory that outlives it, so a restarted plugin finds the volumes it
// staged.
package csi
