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
// The node service (attaching a volume as a block device, formatting and
// mounting it) and ControllerPublish fencing are not built yet: the driver
// runs in controller mode only and advertises no capability it lacks.
package csi
