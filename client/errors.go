package client

import (
	"errors"
	"strings"

	"cairn.io/cairn/internal/wire"
)

// Errors callers branch on (errors.Is).
var (
	// ErrNotFound: the volume does not exist.
	ErrNotFound = errors.New("client: volume not found")
	// ErrFenced: another client opened the volume for writing; this handle
	// may not write (or read) any more.
	ErrFenced = errors.New("client: volume opened for writing by another client (fenced)")
	// ErrClosed: the volume handle was closed.
	ErrClosed = errors.New("client: volume closed")
	// ErrOutOfRange: the IO reaches past the end of the volume.
	ErrOutOfRange = errors.New("client: IO beyond the end of the volume")
	// ErrUnaligned: the IO's offset or length is not a multiple of the
	// volume's block size.
	ErrUnaligned = errors.New("client: IO not aligned to the block size")
	// ErrReadOnly: the volume was opened read-only.
	ErrReadOnly = errors.New("client: volume opened read-only")
	// ErrNoSpace: the cluster has no room for the data.
	ErrNoSpace = errors.New("client: no space left in the pool")
	// ErrUnavailable: the metadata server could not be reached (or did not
	// answer in time); the volume may exist, and a retry may succeed.
	ErrUnavailable = errors.New("client: metadata server unavailable")
	// ErrTimeout: a transient failure lasted longer than the retry timeout.
	ErrTimeout = errors.New("client: IO did not succeed before the retry timeout")
	// ErrDenied: a chunkserver refused this process's certificate the
	// request (its role does not allow chunk IO); retrying cannot help.
	ErrDenied = errors.New("client: chunkserver refused the request to this process's certificate")
)

// denied reports whether err is a chunkserver's refusal by role.
func denied(err error) bool {
	var re *wire.RemoteError
	return errors.As(err, &re) && (strings.Contains(re.Msg, "code = PermissionDenied") || strings.Contains(re.Msg, "code = Unauthenticated"))
}
