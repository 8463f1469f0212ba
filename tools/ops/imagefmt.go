package ops

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// The export format: a volume snapshot's image, whole or as the blocks that
// changed since an earlier snapshot, for import into another volume (on
// this cluster or another). Little-endian:
//
//	header: magic "CAIRNIMG" | version u32 (1) | block size u32 | image size u64 |
//	        flags u32 (1: incremental) | volume, snapshot, since: u16 length + bytes each |
//	        CRC32C u32 of the header before it
//	record: kind u8 ('D' data, 'Z' zeros, 'E' end) | offset u64 | length u32 |
//	        data (D only) | CRC32C u32 of the record before it
//
// The end record's offset is the number of records before it: an export cut
// short, or records lost, is refused at import.
const (
	imageMagic       = "CAIRNIMG"
	imageVersion     = 1
	imageIncremental = 1
	recordData       = 'D'
	recordZeros      = 'Z'
	recordEnd        = 'E'
	maxImageRecord   = 64 << 20 // the largest data record read back
	maxZeroRecord    = 1 << 30
)

// errImageCorrupt is wrapped by every refusal of an image file.
var errImageCorrupt = errors.New("not a valid Cairn export (damaged, cut short or another format)")

// imageHeader describes an export.
type imageHeader struct {
	Block       uint32
	Size        uint64
	Incremental bool
	Volume      string
	Snapshot    string
	Since       string
}

func writeImageHeader(w io.Writer, h imageHeader) error {
	b := []byte(imageMagic)
	b = binary.LittleEndian.AppendUint32(b, imageVersion)
	b = binary.LittleEndian.AppendUint32(b, h.Block)
	b = binary.LittleEndian.AppendUint64(b, h.Size)
	flags := uint32(0)
	if h.Incremental {
		flags |= imageIncremental
	}
	b = binary.LittleEndian.AppendUint32(b, flags)
	for _, s := range []string{h.Volume, h.Snapshot, h.Since} {
		b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	_, err := w.Write(b)
	return err
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func readImageHeader(r *bufio.Reader) (imageHeader, error) {
	var h imageHeader
	fixed := make([]byte, 8+4+4+8+4)
	if _, err := io.ReadFull(r, fixed); err != nil {
		return h, fmt.Errorf("%w: header: %v", errImageCorrupt, err)
	}
	if string(fixed[:8]) != imageMagic {
		return h, fmt.Errorf("%w: magic %q", errImageCorrupt, fixed[:8])
	}
	if v := binary.LittleEndian.Uint32(fixed[8:]); v != imageVersion {
		return h, fmt.Errorf("%w: format version %d, this cairn-ops reads %d", errImageCorrupt, v, imageVersion)
	}
	h.Block = binary.LittleEndian.Uint32(fixed[12:])
	h.Size = binary.LittleEndian.Uint64(fixed[16:])
	h.Incremental = binary.LittleEndian.Uint32(fixed[24:])&imageIncremental != 0
	all := fixed
	var names [3]string
	for i := range names {
		var l [2]byte
		if _, err := io.ReadFull(r, l[:]); err != nil {
			return h, fmt.Errorf("%w: header: %v", errImageCorrupt, err)
		}
		s := make([]byte, binary.LittleEndian.Uint16(l[:]))
		if _, err := io.ReadFull(r, s); err != nil {
			return h, fmt.Errorf("%w: header: %v", errImageCorrupt, err)
		}
		all = append(append(all, l[:]...), s...)
		names[i] = string(s)
	}
	var crc [4]byte
	if _, err := io.ReadFull(r, crc[:]); err != nil {
		return h, fmt.Errorf("%w: header: %v", errImageCorrupt, err)
	}
	if binary.LittleEndian.Uint32(crc[:]) != crc32.Checksum(all, castagnoli) {
		return h, fmt.Errorf("%w: header checksum", errImageCorrupt)
	}
	h.Volume, h.Snapshot, h.Since = names[0], names[1], names[2]
	if h.Block == 0 || h.Size == 0 {
		return h, fmt.Errorf("%w: block size %d, image size %d", errImageCorrupt, h.Block, h.Size)
	}
	return h, nil
}

// imageRecord is one record of an export.
type imageRecord struct {
	Kind   byte
	Offset uint64
	Length uint32
	Data   []byte
}

func writeImageRecord(w io.Writer, rec imageRecord) error {
	b := make([]byte, 0, 13+len(rec.Data)+4)
	b = append(b, rec.Kind)
	b = binary.LittleEndian.AppendUint64(b, rec.Offset)
	b = binary.LittleEndian.AppendUint32(b, rec.Length)
	b = append(b, rec.Data...)
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	_, err := w.Write(b)
	return err
}

// readImageRecord reads the next record, checked; buf is reused for data.
func readImageRecord(r *bufio.Reader, buf []byte) (imageRecord, []byte, error) {
	var head [13]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return imageRecord{}, buf, fmt.Errorf("%w: the file ends without its end record (%v)", errImageCorrupt, err)
	}
	rec := imageRecord{Kind: head[0], Offset: binary.LittleEndian.Uint64(head[1:]), Length: binary.LittleEndian.Uint32(head[9:])}
	crc := crc32.Update(0, castagnoli, head[:])
	switch rec.Kind {
	case recordData:
		if rec.Length == 0 || rec.Length > maxImageRecord {
			return rec, buf, fmt.Errorf("%w: data record of %d bytes", errImageCorrupt, rec.Length)
		}
		if cap(buf) < int(rec.Length) {
			buf = make([]byte, rec.Length)
		}
		rec.Data = buf[:rec.Length]
		if _, err := io.ReadFull(r, rec.Data); err != nil {
			return rec, buf, fmt.Errorf("%w: data record cut short (%v)", errImageCorrupt, err)
		}
		crc = crc32.Update(crc, castagnoli, rec.Data)
	case recordZeros:
		if rec.Length == 0 || rec.Length > maxZeroRecord {
			return rec, buf, fmt.Errorf("%w: zero record of %d bytes", errImageCorrupt, rec.Length)
		}
	case recordEnd:
	default:
		return rec, buf, fmt.Errorf("%w: record kind %#x", errImageCorrupt, rec.Kind)
	}
	var sum [4]byte
	if _, err := io.ReadFull(r, sum[:]); err != nil {
		return rec, buf, fmt.Errorf("%w: record cut short (%v)", errImageCorrupt, err)
	}
	if binary.LittleEndian.Uint32(sum[:]) != crc {
		return rec, buf, fmt.Errorf("%w: record at offset %d fails its checksum", errImageCorrupt, rec.Offset)
	}
	return rec, buf, nil
}
