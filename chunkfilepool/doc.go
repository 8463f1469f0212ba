// Package chunkfilepool keeps a directory of preformatted chunk files for a
// chunkserver and hands them out as chunks and WAL segments.
//
// # Why
//
// A synced 4 KiB write into a sparse file makes the filesystem allocate a
// block; into a merely fallocated file it converts an unwritten extent. Both
// are metadata changes, so the write's fdatasync also commits the filesystem
// journal. A file whose every block was written with zeros and fsynced ahead
// of time has nothing left to allocate or convert: a later overwrite costs
// one data flush and no journal commit. The pool does that work in the
// background, before any user write, and moves a finished file into place
// with one atomic rename when a chunk is created.
//
// # Layout
//
//	<dir>/pool.meta       geometry: chunk size, meta page size, block size, CRC32C
//	<dir>/pool.state      number of files the pool owns (clean, dirty, formatting, handed out), CRC32C
//	<dir>/formatting/<n>  a file being written with zeros; never handed out
//	<dir>/clean/<name>    fully formatted (or re-zeroed) and fsynced; ready for Get
//	<dir>/dirty/<name>    returned by Recycle; zeroed and fsynced before it becomes clean
//
// Every pool file is MetaPageSize + ChunkSize bytes. Files move between the
// directories only by rename, each followed by an fsync of the directories
// involved, so after a crash a file is in exactly one place: a file found in
// formatting/ is formatted again from the start, one found in dirty/ is
// zeroed again, and only clean/ files are ever handed out.
//
// # Use
//
// Open formats Options.InitialChunks files in the background and returns at
// once; Stats reports progress for heartbeats and metrics. Get renames a
// clean file to a destination path (renameat2 RENAME_NOREPLACE: an existing
// file is never overwritten), waiting for the formatter when it can still
// produce one and failing with ErrPoolEmpty when it cannot. Recycle takes a
// file back. When clean files run low the pool formats more, up to
// Options.MaxChunks and while the filesystem keeps Options.ReserveBytes free.
//
// The chunk store (chunkserver/datastore) creates chunks from the pool; the
// copyset WAL takes its segments from the same pool.
//
// Package fsutil beside this one holds the rename, directory fsync and
// atomic metadata write used here and by the chunk store.
package chunkfilepool
