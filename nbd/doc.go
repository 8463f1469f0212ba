// Package nbd is Cairn's NBD export server: it serves volumes to unmodified NBD clients
// (qemu and qemu-img with nbd:// URLs, fio's nbd engine, nbdinfo and nbdcopy from libnbd, and the
// kernel's nbd driver through nbd-client) the way curve-nbd attaches Curve volumes.
//
// # Place in the system
//
// The package knows nothing of the cluster: it depends only on package blockdev. It serves any
// blockdev.Device (ReadAt, WriteAt, UnmapAt and Flush with a context, Size, Close) that a
// blockdev.Catalog opens by name. The gateway wires the catalog to the client library, so that
// the export names are volume names and an export is a shared client.Volume; exports appear and
// disappear as volumes are created and deleted, because the server asks the catalog on every
// NBD_OPT_LIST and opens exports by name when a client selects one. The iSCSI target serves the
// same contract.
//
// # Protocol
//
// Only the fixed newstyle handshake is served (oldstyle and plain newstyle clients are refused),
// with NBD_FLAG_C_NO_ZEROES. Options: NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_INFO and
// NBD_OPT_GO (answering NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_DESCRIPTION and
// NBD_INFO_BLOCK_SIZE: minimum 512, preferred 4096, maximum Config.MaxPayload), NBD_OPT_ABORT,
// NBD_OPT_STRUCTURED_REPLY, the metadata context options with the one context base:allocation, and
// NBD_OPT_STARTTLS when Config.TLS is set (the rest of the negotiation and the transmission then go
// over TLS; with Config.RequireTLS every other option is refused with NBD_REP_ERR_TLS_REQD until
// then, and NBD_OPT_EXPORT_NAME hangs up, as qemu-nbd and nbdkit do); anything else is answered
// with NBD_REP_ERR_UNSUP. Commands: NBD_CMD_READ, WRITE (with FUA),
// FLUSH, TRIM, WRITE_ZEROES (NBD_CMD_FLAG_NO_HOLE writes zeros, otherwise the range is unmapped),
// BLOCK_STATUS (holes of devices that implement blockdev.Mapper; blockstatus.go) and DISC. Requests are checked for known command and flags,
// alignment to 512 bytes, payload size and bounds, and refused with the protocol's error values
// (EINVAL, ENOSPC for writes beyond the end, EOVERFLOW for structured reads over the payload
// limit); device failures become EIO (ENOSPC, EPERM when the backend's error wraps
// syscall.ENOSPC, EDQUOT, EFBIG or EROFS). A request the server cannot parse (bad magic, a stream
// cut mid-message) ends that connection, never the process.
//
// Server.ServeTransmission serves one connection without a handshake, from the transmission phase
// on, with simple replies: the kernel's nbd driver configured through netlink (the CSI node's nbd
// attach) speaks only that phase, and is told the size and Server.TransmissionFlags out of band.
//
// # Concurrency
//
// The requests of one connection run concurrently, up to Config.MaxInFlight at a time and
// Config.MaxInFlightBytes of payload, and each reply is written as soon as its request completes,
// under a per-connection write lock: against a replicated backend where a call takes a
// millisecond, queue depth turns into throughput. A FLUSH waits for every write-type request that
// arrived before it to complete, then calls Device.Flush. A connection that dies (the client goes
// away without NBD_CMD_DISC, a reply cannot be sent) has the contexts of its requests cancelled,
// and a new connection to the same export reads no request until every one of them has returned,
// so that an old write cannot land after a newer one. Close stops reading requests, lets the
// requests in flight finish and answer, then closes connections and exports.
//
// docs/nbd.md covers the protocol coverage, limits and how to attach qemu, fio and nbdcopy.
package nbd
