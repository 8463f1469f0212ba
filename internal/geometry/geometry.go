// Package geometry holds the defaults of a cluster's fixed constants: the
// sizes every component must agree on. The MDS records the constants in
// etcd on a cluster's first start (taking these defaults for the ones its
// configuration leaves out) and hands them to every chunkserver at
// registration; a chunk file pool formats its files to them.
package geometry

const (
	// DefaultChunkSize is the data size of one chunk file: the unit of
	// placement and of copy-on-write.
	DefaultChunkSize = 16 << 20
	// DefaultSegmentSize is the volume space one segment allocation covers.
	DefaultSegmentSize = 1 << 30
	// DefaultBlockSize is the smallest IO unit and alignment.
	DefaultBlockSize = 512
	// DefaultMetaPageSize is the metadata page at the head of a chunk file.
	DefaultMetaPageSize = 4 << 10
)

// CopyUnit is the page size chunkservers track a chunk's pages in: what
// copy on write for snapshots copies, and what a clone's chunk adopts of
// its source. It is 4 KiB (or the block size if larger), doubled until one
// bit per page of a chunk fits in half a meta page beside a 68-byte
// header. Every component computes it from the cluster's constants.
func CopyUnit(chunkSize, metaPageSize, blockSize int64) int64 {
	unit := max(int64(4096), blockSize)
	room := (metaPageSize/2 - 68) * 8
	for (chunkSize+unit-1)/unit > room {
		unit *= 2
	}
	return unit
}
