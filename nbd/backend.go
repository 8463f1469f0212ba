package nbd

import (
	"context"
	"errors"
)

// Backend is the block store behind one export: a byte range of fixed size. A Cairn client volume
// implements it; so does any store with the same shape. All methods may be slow (a replicated write
// takes a network round trip and an fsync) and must be safe for concurrent use: the server keeps many
// requests of one connection in flight at once.
type Backend interface {
	// ReadAt reads len(p) bytes at off, with the io.ReaderAt contract.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off, with the io.WriterAt contract (p is neither modified nor retained).
	// The server acknowledges a write without FUA as soon as WriteAt returns; data it must find
	// durable it asks for with Flush.
	WriteAt(p []byte, off int64) (int, error)
	// UnmapAt discards length bytes at off. Afterwards the range reads as zeros.
	UnmapAt(off, length int64) error
	// Flush makes every write that has returned durable.
	Flush() error
	// Size is the export's length in bytes. The server reads it once per connection.
	Size() int64
}

// Export is a Backend opened for one connection. The server closes it when the connection ends.
type Export interface {
	Backend
	// Close releases the export. It is called once, after the last request of the connection has
	// completed.
	Close() error
}

// Describer may be implemented by an Export to give the human-readable description that clients
// receive with NBD_INFO_DESCRIPTION (nbdinfo prints it). Exports that do not implement it are
// described as "cairn volume <name>".
type Describer interface {
	Description() string
}

// Exports is the set of exports a server offers; in a gateway, the volumes of the cluster. The set may
// change at any time: the server asks for the list whenever a client does and opens an export by name
// when a client selects it.
type Exports interface {
	// List returns the names of the exports a client may open.
	List(ctx context.Context) ([]string, error)
	// Open opens the named export for one connection. It returns an error wrapping
	// ErrUnknownExport when no export has that name. Open is called once for every connection that
	// enters transmission and once for every NBD_OPT_INFO; an implementation that must not open a
	// volume twice (opening a Cairn volume for writing fences earlier openers) shares one open volume
	// among the Exports it returns.
	Open(ctx context.Context, name string) (Export, error)
}

// ErrUnknownExport is wrapped by Exports.Open when no export has the requested name. The server
// answers it with NBD_REP_ERR_UNKNOWN.
var ErrUnknownExport = errors.New("nbd: unknown export")

// ErrServerClosed is returned by Serve and ListenAndServe after Close.
var ErrServerClosed = errors.New("nbd: server closed")
