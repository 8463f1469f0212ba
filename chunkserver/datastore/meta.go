package datastore

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Chunk meta page: the first MetaPageSize bytes of every chunk file.
// Little-endian:
//
//	off len field
//	  0   8 magic "CAIRNCK1"
//	  8   4 format version (1)
//	 12   4 flags: bit 0 set for a clone's chunk (clone.go); others zero
//	 16   8 chunk id
//	 24   8 sequence number the chunk was created under (0: none)
//	 32   8 reserved, zero
//	 40   8 chunk size (data bytes after the page)
//	 48   …  zero up to the last 4 bytes
//	 -4   4 CRC32C (Castagnoli) of every byte of the page before it
const (
	metaMagic = "CAIRNCK1"
	// MetaVersion is the meta page format this package writes.
	MetaVersion = 1
	// MinMetaPageSize is the smallest meta page the format fits in.
	MinMetaPageSize = 512
	metaFieldsLen   = 48
	// MetaFlagClone marks a clone's chunk: its pages read from the clone's
	// source until written (clone.go).
	MetaFlagClone uint32 = 1
)

// ChunkMeta is the content of a chunk's meta page. It is written once, when
// the chunk is created, and never rewritten: what snapshots need later is
// kept in the chunk's version files (version.go).
type ChunkMeta struct {
	Version uint32
	ChunkID uint64
	// CreatedSN is the volume sequence number of the write that created
	// the chunk: snapshots taken before it read the chunk as zeros.
	CreatedSN uint64
	ChunkSize int64
	// Flags are MetaFlag bits.
	Flags uint32
}

// EncodeMetaPage returns a meta page of pageSize bytes for m, with its CRC.
// pageSize must be at least MinMetaPageSize.
func EncodeMetaPage(m ChunkMeta, pageSize int) []byte {
	b := make([]byte, pageSize)
	copy(b, metaMagic)
	binary.LittleEndian.PutUint32(b[8:], m.Version)
	binary.LittleEndian.PutUint32(b[12:], m.Flags)
	binary.LittleEndian.PutUint64(b[16:], m.ChunkID)
	binary.LittleEndian.PutUint64(b[24:], m.CreatedSN)
	binary.LittleEndian.PutUint64(b[40:], uint64(m.ChunkSize))
	binary.LittleEndian.PutUint32(b[pageSize-4:], crc32.Checksum(b[:pageSize-4], castagnoli))
	return b
}

// DecodeMetaPage parses a whole meta page. Any damage (size, magic, CRC,
// version, non-zero reserved bytes) gives an error wrapping ErrCorrupt.
func DecodeMetaPage(page []byte) (ChunkMeta, error) {
	n := len(page)
	if n < MinMetaPageSize {
		return ChunkMeta{}, fmt.Errorf("%w: meta page of %d bytes", ErrCorrupt, n)
	}
	if got, want := binary.LittleEndian.Uint32(page[n-4:]), crc32.Checksum(page[:n-4], castagnoli); got != want {
		return ChunkMeta{}, fmt.Errorf("%w: meta page CRC32C %08x, computed %08x", ErrCorrupt, got, want)
	}
	if string(page[:8]) != metaMagic {
		return ChunkMeta{}, fmt.Errorf("%w: meta page magic %q", ErrCorrupt, page[:8])
	}
	m := ChunkMeta{
		Version:   binary.LittleEndian.Uint32(page[8:]),
		ChunkID:   binary.LittleEndian.Uint64(page[16:]),
		CreatedSN: binary.LittleEndian.Uint64(page[24:]),
		ChunkSize: int64(binary.LittleEndian.Uint64(page[40:])),
		Flags:     binary.LittleEndian.Uint32(page[12:]),
	}
	if m.Version != MetaVersion {
		return ChunkMeta{}, fmt.Errorf("%w: meta page version %d, this build reads %d", ErrCorrupt, m.Version, MetaVersion)
	}
	if m.Flags&^MetaFlagClone != 0 || binary.LittleEndian.Uint64(page[32:]) != 0 {
		return ChunkMeta{}, fmt.Errorf("%w: meta page reserved field set", ErrCorrupt)
	}
	for _, c := range page[metaFieldsLen : n-4] {
		if c != 0 {
			return ChunkMeta{}, fmt.Errorf("%w: meta page reserved bytes set", ErrCorrupt)
		}
	}
	if m.ChunkSize <= 0 {
		return ChunkMeta{}, fmt.Errorf("%w: meta page chunk size %d", ErrCorrupt, m.ChunkSize)
	}
	return m, nil
}
