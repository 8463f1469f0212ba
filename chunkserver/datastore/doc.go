// Package datastore stores the chunks of one copyset on a chunkserver's disk.
//
// A Store owns one directory. Each chunk is one file taken from the
// chunkserver's chunk file pool (package chunkfilepool): a meta page
// (format version, chunk id, sequence numbers for snapshots, CRC32C of the
// page) followed by the chunk's data. Because pool files are preformatted
// with zeros, a chunk reads as zeros where it was never written, and a write
// into it allocates nothing in the filesystem.
//
// # Durability
//
// Creating a chunk is durable before the first write returns: the pool file
// is renamed to a temporary name in the store directory, its meta page is
// written and fdatasynced, it is renamed to its final name (never replacing
// an existing file) and the directory is fsynced. A crash leaves either no
// chunk or a complete one; a temporary file found at Open goes back to the
// pool.
//
// Data writes are pwrites without fsync: the copyset's write-ahead log makes
// them durable. Sync fdatasyncs every chunk written since the previous Sync;
// the copyset calls it at a checkpoint, before recording the applied index
// that lets WAL segments be recycled. A write that completed before Sync
// began is on disk when Sync returns, whatever writes run concurrently.
//
// A meta page whose CRC, magic, version, chunk id or size is wrong makes the
// chunk corrupt: every access returns an error wrapping ErrCorrupt, and
// Delete returns the file to the pool.
//
// # Concurrency and file descriptors
//
// A Store is safe for concurrent use. Writes to different chunks run in
// parallel; the caller (the copyset's apply loop) orders writes and deletes
// of one chunk. Open descriptors are kept in a FileCache, bounded and shared
// by all the stores of a chunkserver; ReadAt and WriteAt on a cached chunk
// cost one pread or pwrite and no allocation.
package datastore
