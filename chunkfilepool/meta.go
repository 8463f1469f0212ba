package chunkfilepool

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Pool meta file ("pool.meta"): the geometry the pool was formatted with.
// Little-endian, fixed size:
//
//	off len field
//	  0   8 magic "CAIRNFP1"
//	  8   4 format version (1)
//	 12   4 reserved, zero
//	 16   8 chunk size (data bytes of a chunk file)
//	 24   8 meta page size
//	 32   8 block size (IO granularity)
//	 40   4 CRC32C (Castagnoli) of bytes 0..39
const (
	poolMetaMagic   = "CAIRNFP1"
	poolMetaVersion = 1
	poolMetaLen     = 44
)

// Geometry is the shape of the files a pool holds. It is fixed when the pool
// is first formatted and recorded in the pool meta file.
type Geometry struct {
	ChunkSize    int64
	MetaPageSize int64
	BlockSize    int64
}

// FileSize is the size of one pool file: meta page plus chunk data.
func (g Geometry) FileSize() int64 { return g.MetaPageSize + g.ChunkSize }

func (g Geometry) String() string {
	return fmt.Sprintf("chunk size %d, meta page size %d, block size %d", g.ChunkSize, g.MetaPageSize, g.BlockSize)
}

// Validate reports whether g describes usable files: a power-of-two block
// size of at least 512 bytes, and chunk and meta page sizes that are positive
// multiples of it.
func (g Geometry) Validate() error {
	switch {
	case g.BlockSize < 512 || g.BlockSize&(g.BlockSize-1) != 0:
		return fmt.Errorf("%w: block size %d is not a power of two >= 512", ErrInvalidOptions, g.BlockSize)
	case g.ChunkSize <= 0 || g.ChunkSize%g.BlockSize != 0:
		return fmt.Errorf("%w: chunk size %d is not a positive multiple of the block size %d", ErrInvalidOptions, g.ChunkSize, g.BlockSize)
	case g.MetaPageSize <= 0 || g.MetaPageSize%g.BlockSize != 0:
		return fmt.Errorf("%w: meta page size %d is not a positive multiple of the block size %d", ErrInvalidOptions, g.MetaPageSize, g.BlockSize)
	}
	return nil
}

// EncodePoolMeta returns the pool meta file content for g.
func EncodePoolMeta(g Geometry) []byte {
	b := make([]byte, poolMetaLen)
	copy(b, poolMetaMagic)
	binary.LittleEndian.PutUint32(b[8:], poolMetaVersion)
	binary.LittleEndian.PutUint64(b[16:], uint64(g.ChunkSize))
	binary.LittleEndian.PutUint64(b[24:], uint64(g.MetaPageSize))
	binary.LittleEndian.PutUint64(b[32:], uint64(g.BlockSize))
	binary.LittleEndian.PutUint32(b[40:], crc32.Checksum(b[:40], castagnoli))
	return b
}

// DecodePoolMeta parses a pool meta file. A wrong length, magic, version or
// CRC, or a geometry that does not validate, gives an error wrapping
// ErrBadMeta.
func DecodePoolMeta(b []byte) (Geometry, error) {
	if len(b) != poolMetaLen {
		return Geometry{}, fmt.Errorf("%w: pool meta is %d bytes, want %d", ErrBadMeta, len(b), poolMetaLen)
	}
	if string(b[:8]) != poolMetaMagic {
		return Geometry{}, fmt.Errorf("%w: pool meta magic %q", ErrBadMeta, b[:8])
	}
	if got, want := binary.LittleEndian.Uint32(b[40:]), crc32.Checksum(b[:40], castagnoli); got != want {
		return Geometry{}, fmt.Errorf("%w: pool meta CRC32C %08x, computed %08x", ErrBadMeta, got, want)
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != poolMetaVersion {
		return Geometry{}, fmt.Errorf("%w: pool meta version %d, this build reads %d", ErrBadMeta, v, poolMetaVersion)
	}
	if r := binary.LittleEndian.Uint32(b[12:]); r != 0 {
		return Geometry{}, fmt.Errorf("%w: pool meta reserved field %#x", ErrBadMeta, r)
	}
	g := Geometry{
		ChunkSize:    int64(binary.LittleEndian.Uint64(b[16:])),
		MetaPageSize: int64(binary.LittleEndian.Uint64(b[24:])),
		BlockSize:    int64(binary.LittleEndian.Uint64(b[32:])),
	}
	if err := g.Validate(); err != nil {
		return Geometry{}, fmt.Errorf("%w: %w", ErrBadMeta, err)
	}
	return g, nil
}

// Pool state file ("pool.state"): how many files the pool owns (clean,
// dirty, being formatted and handed out). Little-endian, fixed size:
//
//	off len field
//	  0   8 magic "CAIRNFS1"
//	  8   8 owned files
//	 16   4 CRC32C of bytes 0..15
const (
	poolStateMagic = "CAIRNFS1"
	poolStateLen   = 20
)

func encodePoolState(owned int) []byte {
	b := make([]byte, poolStateLen)
	copy(b, poolStateMagic)
	binary.LittleEndian.PutUint64(b[8:], uint64(owned))
	binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(b[:16], castagnoli))
	return b
}

func decodePoolState(b []byte) (int, error) {
	if len(b) != poolStateLen || string(b[:8]) != poolStateMagic {
		return 0, fmt.Errorf("%w: pool state file is not a pool state (%d bytes)", ErrBadMeta, len(b))
	}
	if got, want := binary.LittleEndian.Uint32(b[16:]), crc32.Checksum(b[:16], castagnoli); got != want {
		return 0, fmt.Errorf("%w: pool state CRC32C %08x, computed %08x", ErrBadMeta, got, want)
	}
	n := binary.LittleEndian.Uint64(b[8:])
	if n > 1<<40 {
		return 0, fmt.Errorf("%w: pool state claims %d files", ErrBadMeta, n)
	}
	return int(n), nil
}
