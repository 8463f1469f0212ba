package datastore

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"slices"
	"strconv"
	"strings"
)

// A version file keeps what snapshots of a chunk need of its past: the
// pages of the chunk as they were at the end of the sequence numbers
// [From, To], copied just before a later write overwrote them (copy on
// write). Its name is the chunk's name, "_snap_" and From; its file comes
// from the chunk file pool, laid out like a chunk's (meta page, then the
// data area, each page at its offset in the chunk).
//
// Its meta page is rewritten each time pages are copied in, so it holds two
// slots, each half of the page, written alternately: a crash while one is
// written leaves the other. Little-endian, in each slot:
//
//	off len field
//	  0   8 magic "CAIRNCV1"
//	  8   4 format version (1)
//	 12   4 copy unit in bytes (a page of the bitmap)
//	 16   8 chunk id
//	 24   8 From: first sequence number it keeps the chunk for
//	 32   8 To: last sequence number it keeps the chunk for
//	 40   8 chunk size
//	 48   8 generation: the slot with the higher valid one is current
//	 56   8 flags: bit 0 set when an absent bitmap follows the bitmap
//	 64   …  bitmap: bit i set when page i (of the copy unit) is held
//	  …   …  absent bitmap (a clone's chunk, clone.go): bit i set when page
//	         i was not the chunk's own: its snapshots read the clone's
//	         source there
//	 -4   4 CRC32C of the slot before it
const (
	versionMagic     = "CAIRNCV1"
	versionFormat    = 1
	versionHeaderLen = 64
	versionInfix     = "_snap_"
	versionHasAbsent = 1 // flags bit
)

// versionMeta is the content of a version file's current meta slot.
type versionMeta struct {
	ChunkID    uint64
	From, To   uint64
	ChunkSize  int64
	Unit       int64
	Generation uint64
	Bitmap     []byte
	// Absent marks the pages a clone's chunk did not own when the
	// version was cut (nil: every page was its own).
	Absent []byte
}

// absent reports whether page i was not the chunk's own in the version.
func (m *versionMeta) absent(i int64) bool { return m.Absent != nil && m.Absent[i/8]&(1<<(i%8)) != 0 }

// covers reports whether the version says what page i was: held, or not
// the chunk's own.
func (m *versionMeta) covers(i int64) bool { return m.has(i) || m.absent(i) }

// has reports whether page i is held.
func (m *versionMeta) has(i int64) bool { return m.Bitmap[i/8]&(1<<(i%8)) != 0 }

// set marks page i held.
func (m *versionMeta) set(i int64) { m.Bitmap[i/8] |= 1 << (i % 8) }

// held counts the pages held.
func (m *versionMeta) held() int {
	n := 0
	for _, b := range m.Bitmap {
		for ; b != 0; b &= b - 1 {
			n++
		}
	}
	return n
}

func (m *versionMeta) clone() versionMeta {
	c := *m
	c.Bitmap = slices.Clone(m.Bitmap)
	c.Absent = slices.Clone(m.Absent)
	return c
}

// encodeVersionSlot returns the slot for m, of slotSize bytes.
func encodeVersionSlot(m *versionMeta, slotSize int) []byte {
	b := make([]byte, slotSize)
	copy(b, versionMagic)
	binary.LittleEndian.PutUint32(b[8:], versionFormat)
	binary.LittleEndian.PutUint32(b[12:], uint32(m.Unit))
	binary.LittleEndian.PutUint64(b[16:], m.ChunkID)
	binary.LittleEndian.PutUint64(b[24:], m.From)
	binary.LittleEndian.PutUint64(b[32:], m.To)
	binary.LittleEndian.PutUint64(b[40:], uint64(m.ChunkSize))
	binary.LittleEndian.PutUint64(b[48:], m.Generation)
	copy(b[versionHeaderLen:], m.Bitmap)
	if m.Absent != nil {
		binary.LittleEndian.PutUint64(b[56:], versionHasAbsent)
		copy(b[versionHeaderLen+len(m.Bitmap):], m.Absent)
	}
	binary.LittleEndian.PutUint32(b[slotSize-4:], crc32.Checksum(b[:slotSize-4], castagnoli))
	return b
}

// decodeVersionSlot parses one slot; any damage gives an error wrapping
// ErrCorrupt.
func decodeVersionSlot(b []byte, bitmapLen int) (versionMeta, error) {
	n := len(b)
	if n < versionHeaderLen+bitmapLen+4 {
		return versionMeta{}, fmt.Errorf("%w: version slot of %d bytes", ErrCorrupt, n)
	}
	if got, want := binary.LittleEndian.Uint32(b[n-4:]), crc32.Checksum(b[:n-4], castagnoli); got != want {
		return versionMeta{}, fmt.Errorf("%w: version slot CRC32C %08x, computed %08x", ErrCorrupt, got, want)
	}
	flags := binary.LittleEndian.Uint64(b[56:])
	if string(b[:8]) != versionMagic || binary.LittleEndian.Uint32(b[8:]) != versionFormat || flags&^versionHasAbsent != 0 {
		return versionMeta{}, fmt.Errorf("%w: version slot header", ErrCorrupt)
	}
	if flags&versionHasAbsent != 0 && n < versionHeaderLen+2*bitmapLen+4 {
		return versionMeta{}, fmt.Errorf("%w: version slot of %d bytes with an absent bitmap", ErrCorrupt, n)
	}
	m := versionMeta{
		Unit:       int64(binary.LittleEndian.Uint32(b[12:])),
		ChunkID:    binary.LittleEndian.Uint64(b[16:]),
		From:       binary.LittleEndian.Uint64(b[24:]),
		To:         binary.LittleEndian.Uint64(b[32:]),
		ChunkSize:  int64(binary.LittleEndian.Uint64(b[40:])),
		Generation: binary.LittleEndian.Uint64(b[48:]),
		Bitmap:     slices.Clone(b[versionHeaderLen : versionHeaderLen+bitmapLen]),
	}
	if flags&versionHasAbsent != 0 {
		m.Absent = slices.Clone(b[versionHeaderLen+bitmapLen : versionHeaderLen+2*bitmapLen])
	}
	if m.From == 0 || m.To < m.From {
		return versionMeta{}, fmt.Errorf("%w: version slot keeps sequence numbers %d..%d", ErrCorrupt, m.From, m.To)
	}
	return m, nil
}

// decodeVersionPage picks the current slot of a version meta page: the
// valid one with the higher generation.
func decodeVersionPage(page []byte, bitmapLen int) (versionMeta, error) {
	half := len(page) / 2
	a, errA := decodeVersionSlot(page[:half], bitmapLen)
	b, errB := decodeVersionSlot(page[half:], bitmapLen)
	switch {
	case errA == nil && errB == nil:
		if b.Generation > a.Generation {
			return b, nil
		}
		return a, nil
	case errA == nil:
		return a, nil
	case errB == nil:
		return b, nil
	}
	return versionMeta{}, fmt.Errorf("both meta slots are damaged: %w", errA)
}

func versionName(id, from uint64) string {
	return chunkName(id) + versionInfix + strconv.FormatUint(from, 10)
}

// parseVersionName reads a version file's chunk id and From.
func parseVersionName(name string) (id, from uint64, ok bool) {
	chunkPart, fromPart, found := strings.Cut(name, versionInfix)
	if !found {
		return 0, 0, false
	}
	id, ok = parseChunkName(chunkPart)
	if !ok {
		return 0, 0, false
	}
	from, err := strconv.ParseUint(fromPart, 10, 64)
	if err != nil || versionName(id, from) != name {
		return 0, 0, false
	}
	return id, from, true
}
