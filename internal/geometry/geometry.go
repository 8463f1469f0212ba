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
