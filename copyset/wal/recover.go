package wal

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// sectorSize is the unit a device writes atomically: after a power cut
// every sector of an interrupted write holds either its old content or its
// new content. Its old content is zeros from the last synced offset on:
// segments are preformatted with zeros and recovery zeroes (and syncs)
// everything after the last valid record.
const sectorSize = 512

// recover reads every segment, rebuilds per-group logs and the recycling
// index, and cuts the torn tail of the last segment. Damage anywhere else
// is ErrCorrupt: a segment is synced whole, end-of-segment record included,
// before the next one's header is written, so only the last segment can
// hold an interrupted write.
func (w *WAL) recover() (map[uint64]*GroupLog, error) {
	des, err := os.ReadDir(w.opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("wal: list dir: %w", err)
	}
	type seginfo struct {
		seq  uint64
		name string
	}
	var found []seginfo
	for _, de := range des {
		name := de.Name()
		if name == sparePath || !strings.HasSuffix(name, ".wal") {
			continue
		}
		seq, err := strconv.ParseUint(strings.TrimSuffix(name, ".wal"), 16, 64)
		if err != nil {
			return nil, fmt.Errorf("wal: unexpected file %s in %s", name, w.opts.Dir)
		}
		found = append(found, seginfo{seq, name})
	}
	sort.Slice(found, func(i, j int) bool { return found[i].seq < found[j].seq })
	for i := 1; i < len(found); i++ {
		if found[i].seq != found[i-1].seq+1 {
			return nil, fmt.Errorf("%w: segment %016x is missing between %s and %s", ErrCorrupt, found[i-1].seq+1, found[i-1].name, found[i].name)
		}
	}

	logs := make(map[uint64]*GroupLog)
	buf := make([]byte, w.fileSize)
	for i, fi := range found {
		last := i == len(found)-1
		path := filepath.Join(w.opts.Dir, fi.name)
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("wal: open %s: %w", fi.name, err)
		}
		if n, err := f.ReadAt(buf, 0); err != nil && n != len(buf) {
			f.Close()
			return nil, fmt.Errorf("wal: read %s: %w", fi.name, err)
		}
		// Read once; keep it out of the page cache like what the log
		// writes (direct.go).
		_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		seq, ok, err := decodeSegmentHeader(buf[:headerBlockSize])
		if err == nil && ok && seq != fi.seq {
			err = fmt.Errorf("%w: %s holds sequence %d", ErrCorrupt, fi.name, seq)
		}
		if err == nil && !ok && !last {
			err = fmt.Errorf("%w: segment %s has no header but later segments exist", ErrCorrupt, fi.name)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("wal: segment %s: %w", fi.name, err)
		}
		if !ok {
			// The last segment's header never reached the disk: the
			// segment was started by a batch that was never acknowledged.
			f.Close()
			w.log.Warn("dropping the last segment: its header was never written", "segment", fi.name)
			if err := w.opts.Source.Recycle(path); err != nil {
				return nil, fmt.Errorf("wal: recycle %s: %w", fi.name, err)
			}
			// Its number is used again by the next segment: the log must
			// stay a run of consecutive numbers.
			w.nextSeq = max(w.nextSeq, fi.seq)
			continue
		}
		w.nextSeq = max(w.nextSeq, fi.seq+1)
		seg := &segment{seq: seq, path: path, f: f, groups: make(map[uint64]*segGroup)}
		w.mu.segs = append(w.mu.segs, seg)
		off := int64(headerBlockSize)
		for {
			rec, size, ok := decodeRecord(buf[off:], seq)
			if !ok {
				break
			}
			if rec.typ == recEndSegment {
				off += int64(size)
				seg.closed = true
				break
			}
			if err := w.applyRecord(logs, seg, rec); err != nil {
				f.Close()
				return nil, fmt.Errorf("wal: segment %s offset %d: %w", fi.name, off, err)
			}
			off += int64(size)
		}
		seg.writeOff, seg.syncedOff = off, off
		if seg.closed {
			f.Close()
			seg.f = nil
			continue
		}
		if !last {
			f.Close()
			return nil, fmt.Errorf("%w: segment %s: invalid record at offset %d before its end-of-segment record, and later segments exist", ErrCorrupt, fi.name, off)
		}
		if err := w.checkTornTail(buf, off); err != nil {
			f.Close()
			return nil, fmt.Errorf("wal: segment %s: %w", fi.name, err)
		}
		// The log ends here. Cut whatever follows the last valid record so
		// that it can never be read back as records.
		if err := w.cutTail(seg); err != nil {
			return nil, err
		}
		// The next group commit rewrites the start of the page the log
		// ends in, to write whole pages (writer.go).
		seg.tail = append([]byte(nil), buf[off&^(pageSize-1):off]...)
	}
	w.nextSeq = max(w.nextSeq, 1)
	return logs, nil
}

// checkTornTail decides whether the bytes at off of the last segment (where
// no valid record starts) are the tail of an interrupted write or damage to
// data that was acknowledged. An interrupted write is one group commit: it
// starts at the last synced offset, spans at most tornWindow bytes, and
// every sector of it holds either its old content (zeros from the synced
// offset on) or what was written. So it is damage when non-zero bytes lie
// further than one write beyond off, or when the record at off is complete
// (no sector of it can have kept its old content) and still fails its
// checksum.
//
// A sector that kept its old content is zero from the synced offset, so
// from off (or, past the record's first sector, from the sector's start) to
// the sector's end, whatever part of it the record covers: the record's
// header when the write was torn right at its start (the length then reads
// 0), a few bytes of a small record across a page boundary. Only when no
// sector of the record is zero that far is the record known to be complete.
func (w *WAL) checkTornTail(buf []byte, off int64) error {
	rest := buf[off:]
	end := int64(len(bytes.TrimRight(rest, "\x00"))) // bytes up to the last non-zero one
	if end == 0 {
		return nil // a clean end: nothing was written here
	}
	if end > w.tornWindow() {
		return fmt.Errorf("%w: invalid record at offset %d followed by data up to offset %d, more than one write can leave behind", ErrCorrupt, off, off+end)
	}
	if len(rest) < recordHeaderSize {
		return nil
	}
	n := int64(recordHeaderSize) + int64(binary.LittleEndian.Uint32(rest))
	if n > int64(len(rest)) || n > end {
		return nil // the record was never completely written
	}
	for s := (off / sectorSize) * sectorSize; s < off+n; s += sectorSize {
		if allZero(buf[max(s, off):min(s+sectorSize, int64(len(buf)))]) {
			return nil // a sector of the record may never have reached the disk
		}
	}
	return fmt.Errorf("%w: record at offset %d (%d bytes) is complete on disk but fails its checksum", ErrCorrupt, off, n)
}

// tornWindow bounds the bytes one group commit writes before it syncs (see
// writeBatch): what an interrupted write can leave past the last record.
func (w *WAL) tornWindow() int64 {
	return int64(w.opts.MaxBatchBytes) + w.fileSize/4 + 2*headerBlockSize
}

// cutTail zeroes a segment from its write offset to the end and syncs it.
func (w *WAL) cutTail(seg *segment) error {
	zero := make([]byte, 1<<20)
	for off := seg.writeOff; off < w.fileSize; {
		n := min(int64(len(zero)), w.fileSize-off)
		if _, err := seg.f.WriteAt(zero[:n], off); err != nil {
			return fmt.Errorf("wal: cut tail of %s: %w", filepath.Base(seg.path), err)
		}
		off += n
	}
	if err := unix.Fdatasync(int(seg.f.Fd())); err != nil {
		return fmt.Errorf("wal: sync cut tail of %s: %w", filepath.Base(seg.path), err)
	}
	_ = unix.Fadvise(int(seg.f.Fd()), 0, 0, unix.FADV_DONTNEED)
	return nil
}

// applyRecord adds one recovered record to its group's log and to the
// recycling index.
func (w *WAL) applyRecord(logs map[uint64]*GroupLog, seg *segment, rec record) error {
	g := rec.group
	if rec.typ == recForget {
		delete(logs, g)
		w.noteLocked(segUpdate{seg: seg, group: g, kind: kindForget})
		return nil
	}
	gl := logs[g]
	if gl == nil {
		gl = &GroupLog{}
		logs[g] = gl
	}
	switch rec.typ {
	case recEntries:
		ents, err := decodeEntries(rec.payload)
		if err != nil {
			return err
		}
		if len(ents) == 0 {
			return nil
		}
		first := ents[0].GetIndex()
		if n := len(gl.Entries); n > 0 {
			base, last := gl.Entries[0].GetIndex(), gl.Entries[n-1].GetIndex()
			switch {
			case first > last+1:
				return fmt.Errorf("%w: group %d entries jump from %d to %d", ErrCorrupt, g, last, first)
			case first <= base:
				gl.Entries = gl.Entries[:0]
			default:
				gl.Entries = gl.Entries[:first-base]
			}
		} else if gl.Snapshot != nil && first > gl.Snapshot.Index+1 {
			return fmt.Errorf("%w: group %d entries start at %d after snapshot %d", ErrCorrupt, g, first, gl.Snapshot.Index)
		}
		gl.Entries = append(gl.Entries, ents...)
		w.noteLocked(segUpdate{seg: seg, group: g, kind: kindEntries, first: first, last: ents[len(ents)-1].GetIndex()})
	case recHardState:
		hs, err := decodeHardState(rec.payload)
		if err != nil {
			return err
		}
		gl.HardState = MergeHardState(gl.HardState, hs)
		w.noteLocked(segUpdate{seg: seg, group: g, kind: kindHardState, hs: hs})
	case recSnapshot, recSnapshotEpoch:
		s, err := decodeSnapshot(rec.typ, rec.payload)
		if err != nil {
			return err
		}
		gl.Snapshot = s
		gl.Entries = nil
		w.noteLocked(segUpdate{seg: seg, group: g, kind: kindSnapshot, last: s.Index})
	default:
		return fmt.Errorf("%w: unknown record type %d", ErrCorrupt, rec.typ)
	}
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
