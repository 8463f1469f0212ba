package blockdev

import (
	"context"
	"errors"
)

// Device is an open block device. All methods are safe for concurrent use
// and may be slow (a replicated write takes a network round trip and an
// fsync): frontends keep many calls of one device in flight at once.
type Device interface {
	// ReadAt reads len(p) bytes at off, with the io.ReaderAt contract: a
	// short read comes with an error.
	ReadAt(ctx context.Context, p []byte, off int64) (n int, err error)
	// WriteAt writes p at off, with the io.WriterAt contract (p is neither
	// modified nor retained after the call returns). A write that returns
	// without error is durable when the device says so in its
	// documentation, and at the latest after the next Flush.
	WriteAt(ctx context.Context, p []byte, off int64) (n int, err error)
	// UnmapAt discards length bytes at off; the range reads as zeros
	// afterwards.
	UnmapAt(ctx context.Context, off, length int64) error
	// Flush makes every write that returned before it durable.
	Flush(ctx context.Context) error
	// Size is the device's length in bytes. It may grow while the device
	// is open.
	Size() int64
	// Close releases the device. The frontends call it once, after the
	// last call they made has returned.
	Close() error
}

// Catalog is the set of devices a frontend offers; in a gateway, the
// volumes of the cluster. It may change at any time: frontends ask for the
// list whenever a client does and open a device by name when a client
// selects it.
type Catalog interface {
	// List returns the names of the devices a client may open.
	List(ctx context.Context) ([]string, error)
	// Open opens the named device for one user (an NBD connection, an
	// iSCSI target's sessions). It returns an error wrapping ErrNotFound
	// when no device has that name, ErrUnavailable when it cannot tell now. An implementation that must not open
	// a store twice (opening a Cairn volume for writing fences earlier
	// openers) shares one open store among the Devices it returns.
	Open(ctx context.Context, name string) (Device, error)
}

// ErrNotFound is wrapped by Catalog.Open when no device has the requested
// name. NBD answers it with NBD_REP_ERR_UNKNOWN, iSCSI with a login
// failure "target not found".
var ErrNotFound = errors.New("blockdev: no device of that name")

// ErrUnavailable is wrapped by Catalog.Open when the device cannot be opened
// now for a reason that may pass (the metadata it needs cannot be reached):
// the device may exist. NBD answers it with NBD_REP_ERR_SHUTDOWN ("try
// again later") and a message saying why, iSCSI with a login failure
// "service unavailable".
var ErrUnavailable = errors.New("blockdev: device temporarily unavailable")

// Extent is a run of a device's bytes that are all allocated or all holes.
type Extent struct {
	Length int64
	// Hole: the run was never written (or was unmapped) and reads as zeros
	// without any storage behind it.
	Hole bool
}

// Mapper may be implemented by a Device that knows which of its ranges are
// holes, so that frontends can tell clients (NBD base:allocation) and copies
// skip them. Map describes [off, off+length) from off in order; the extents
// may cover less than length (the caller asks again from where they end)
// but never more, and at least one is returned when length > 0.
type Mapper interface {
	Map(ctx context.Context, off, length int64) ([]Extent, error)
}

// ReadOnly may be implemented by a Device that refuses writes (a volume's
// snapshot): frontends tell clients so up front (NBD's read-only flag, the
// SCSI write-protect bit) instead of failing each write.
type ReadOnly interface {
	ReadOnly() bool
}

// IsReadOnly reports whether d says it refuses writes.
func IsReadOnly(d Device) bool {
	ro, ok := d.(ReadOnly)
	return ok && ro.ReadOnly()
}
