// Package fsutil holds the few filesystem operations that Cairn's durable
// on-disk state is built from: a rename that never replaces an existing file
// (renameat2 RENAME_NOREPLACE), an fsync of a directory so that a rename or a
// create survives a crash, and the temp + fsync + rename + fsync(dir) write
// of a small metadata file.
//
// The chunk file pool uses them to hand chunk files out and take them back;
// the chunk store uses them to create chunks; any other part of the
// chunkserver that keeps a metadata file can use WriteFileAtomic.
package fsutil
