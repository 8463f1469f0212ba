// Package blockdev is the one contract between Cairn's frontends and the
// block stores they serve: a Device is a byte range that can be read,
// written, unmapped and flushed, and a Catalog lists devices and opens them
// by name.
//
// The NBD server (package nbd) and the iSCSI target (package iscsi and its
// SCSI layer, iscsi/scsi) serve any Device a Catalog opens; they depend on
// this package and on nothing of the cluster. The gateway (package gateway)
// implements the Catalog over the volumes of a Cairn cluster, each opened
// through the client library, whose Volume satisfies Device. The shape
// follows Longhorn's ReaderWriterUnmapperAt: io.ReaderAt and io.WriterAt
// plus UnmapAt, each taking a context.
//
// # Contexts and cancellation
//
// Every IO method takes a context. A frontend derives it from the
// connection that carries the request and cancels it when that connection
// dies, so that the IO of a dead connection ends promptly instead of
// retrying on behalf of nobody. A Device must then return the context's
// error soon. What a cancelled call did is unknown to the caller:
//
//   - a cancelled read returns no data the caller may rely on;
//   - a cancelled write or unmap may have been applied, wholly or in part,
//     or not at all; an implementation must guarantee only that nothing of
//     it is applied after the call has returned, so that a caller that
//     waits for a cancelled call to return may then issue a newer write to
//     the same blocks and know it will not be overwritten by the old one.
//
// Frontends rely on that last guarantee: before a new connection of the
// same initiator (or to the same export) issues IO, they cancel the IO of
// the dead one and wait for every call of it to return.
//
// # Sizes and alignment
//
// Offsets and lengths the frontends pass are multiples of 512 bytes and lie
// within Size(); a Device may refuse others with an error. Size may grow
// while the device is open (a volume extended by an operator) and the
// frontends re-read it.
package blockdev
