package datastore

import "errors"

var (
	// ErrChunkNotExist is returned for a chunk that was never written or was
	// deleted.
	ErrChunkNotExist = errors.New("datastore: chunk does not exist")
	// ErrInvalidRange is returned for an offset or length that is not a
	// multiple of the block size, is empty, or reaches outside the chunk.
	// Nothing is changed.
	ErrInvalidRange = errors.New("datastore: invalid range")
	// ErrNoSpace is returned when a new chunk needs a file and the chunk file
	// pool has none; it wraps chunkfilepool.ErrPoolEmpty. Nothing is changed.
	ErrNoSpace = errors.New("datastore: no space for a new chunk")
	// ErrCorrupt is returned for a chunk whose meta page does not check out
	// (bad CRC, magic, version, chunk id or file size). Its data is not
	// served.
	ErrCorrupt = errors.New("datastore: corrupt chunk")
	// ErrClosed is returned by calls on a closed or destroyed Store.
	ErrClosed = errors.New("datastore: store is closed")
	// ErrLocked is returned by Open when another Store has the directory
	// open.
	ErrLocked = errors.New("datastore: store directory is in use")
)
