package chunkfilepool

import "errors"

var (
	// ErrPoolEmpty is returned (wrapped, with the reason) by Get when no clean
	// file is available and the pool cannot produce one: it holds MaxChunks
	// files, the disk would fall below ReserveBytes, formatting failed, or the
	// wait for formatting ran past the deadline.
	ErrPoolEmpty = errors.New("chunkfilepool: no clean chunk file available")

	// ErrConfigMismatch is returned by Open when the pool directory was
	// formatted with a geometry (chunk, meta page or block size) other than
	// the one asked for. Nothing in the directory is changed.
	ErrConfigMismatch = errors.New("chunkfilepool: pool was formatted with another geometry")

	// ErrBadMeta is returned by Open when the pool meta or state file is
	// unreadable, has a bad CRC, or the directory looks like a pool without
	// its meta file. The pool is not trusted and nothing is changed.
	ErrBadMeta = errors.New("chunkfilepool: bad pool meta")

	// ErrInvalidOptions is returned by Open for options that cannot describe
	// a pool (sizes that are not multiples of the block size, MaxChunks below
	// InitialChunks, ...).
	ErrInvalidOptions = errors.New("chunkfilepool: invalid options")

	// ErrLocked is returned by Open when another Pool, in this process or
	// another, has the directory open.
	ErrLocked = errors.New("chunkfilepool: pool directory is in use")

	// ErrClosed is returned by calls on a closed Pool.
	ErrClosed = errors.New("chunkfilepool: pool is closed")
)
