// Package client is Cairn's volume library: it turns a volume of the cluster
// into something that reads and writes like a disk: a Volume is a
// blockdev.Device (ReadAt, WriteAt, UnmapAt and Flush, each taking a context,
// Size and Close), for the NBD and iSCSI gateways, tools and applications.
//
// A volume's byte range maps to segments (allocated by the MDS on the first
// write into them), each segment to a fixed number of chunks, and each chunk
// to the copyset (Raft group of three chunkservers) that stores it. The
// client:
//
//   - splits every IO at chunk bounds (and into pieces small enough for one
//     chunk request) and keeps many pieces in flight at once, at most
//     Options.MaxInflight of them and Options.MaxInflightBytes of data
//     (64 MiB by default); an IO beyond that waits for earlier pieces;
//   - allocates a segment at the MDS on the first write into it and caches
//     the chunk -> copyset map, which never changes once allocated;
//   - caches each copyset's members and leader, sends each piece to the
//     leader, follows REDIRECTED answers (which name the new leader), and
//     asks the MDS again when a copyset's members cannot be reached;
//   - retries transient failures (no leader yet, leader changes, overload,
//     a chunkserver restarting, an MDS failover) with jittered exponential
//     backoff until Options.RetryTimeout, instead of failing the IO;
//   - carries the volume's epoch, obtained when it opened the volume for
//     writing: when another client opens the volume for writing, the
//     chunkservers answer EPOCH_TOO_OLD (or, one cut off from the MDS
//     whose epoch lease ran out, UNAVAILABLE, and then the MDS refuses the
//     handle's session renewal) and every later IO fails with ErrFenced at
//     once, never retried;
//   - reads never-written ranges (unallocated segments, missing chunks) as
//     zeros;
//   - renews its MDS session in the background and follows the volume's
//     size when it is extended.
//
// A write returns only once it is durable on a quorum of its copyset, so
// Flush has nothing to wait for beyond writes still in flight.
//
// Every IO takes the caller's context. When it ends, the client stops
// retrying and returns its error promptly; closing the volume ends every IO
// in the same way (with ErrClosed). A cancelled write has an unknown outcome
// (it may have been applied in part or whole) but is never applied after
// the call returned: see Volume.WriteAt.
package client
