package wal

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// recover reads every segment, rebuilds per-group logs and the recycling
// index, and cuts a torn tail.
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

	logs := make(map[uint64]*GroupLog)
	buf := make([]byte, w.fileSize)
	ended := false // the log ended before the segment being read
	for i, fi := range found {
		path := filepath.Join(w.opts.Dir, fi.name)
		if fi.seq >= w.nextSeq {
			w.nextSeq = fi.seq + 1
		}
		if ended {
			// Everything after the end of the log belongs to a batch that
			// was never acknowledged.
			w.log.Warn("dropping segment after the end of the log", "segment", fi.name)
			if err := w.opts.Source.Recycle(path); err != nil {
				return nil, fmt.Errorf("wal: recycle %s: %w", fi.name, err)
			}
			continue
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("wal: open %s: %w", fi.name, err)
		}
		if n, err := f.ReadAt(buf, 0); err != nil && n != len(buf) {
			f.Close()
			return nil, fmt.Errorf("wal: read %s: %w", fi.name, err)
		}
		seq, ok, err := decodeSegmentHeader(buf[:headerBlockSize])
		if err == nil && ok && seq != fi.seq {
			err = fmt.Errorf("%w: %s holds sequence %d", ErrCorrupt, fi.name, seq)
		}
		if err != nil || !ok {
			f.Close()
			if err != nil && i != len(found)-1 {
				return nil, fmt.Errorf("wal: segment %s: %w", fi.name, err)
			}
			// A last segment whose header never reached the disk holds
			// nothing that was acknowledged.
			w.log.Warn("dropping segment without a valid header", "segment", fi.name, "err", err)
			if err := w.opts.Source.Recycle(path); err != nil {
				return nil, fmt.Errorf("wal: recycle %s: %w", fi.name, err)
			}
			ended = true
			continue
		}
		seg := &segment{seq: seq, path: path, f: f, groups: make(map[uint64]*segGroup)}
		off := int64(headerBlockSize)
		for {
			rec, size, ok := decodeRecord(buf[off:], seq)
			if !ok {
				break
			}
			off += int64(size)
			if rec.typ == recEndSegment {
				seg.closed = true
				break
			}
			if err := w.applyRecord(logs, seg, rec); err != nil {
				f.Close()
				return nil, fmt.Errorf("wal: segment %s offset %d: %w", fi.name, off-int64(size), err)
			}
		}
		seg.writeOff, seg.syncedOff = off, off
		w.mu.segs = append(w.mu.segs, seg)
		if seg.closed {
			f.Close()
			seg.f = nil
			continue
		}
		// The log ends here. Cut whatever follows the last valid record so
		// that it can never be read back as records.
		if err := w.cutTail(seg); err != nil {
			return nil, err
		}
		ended = true
	}
	if w.nextSeq == 0 {
		w.nextSeq = 1
	}
	return logs, nil
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
	return nil
}

func (w *WAL) applyRecord(logs map[uint64]*GroupLog, seg *segment, rec record) error {
	gl := logs[rec.group]
	if gl == nil {
		gl = &GroupLog{}
		logs[rec.group] = gl
	}
	sg := seg.groups[rec.group]
	if sg == nil {
		sg = &segGroup{}
		seg.groups[rec.group] = sg
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
				return fmt.Errorf("%w: group %d entries jump from %d to %d", ErrCorrupt, rec.group, last, first)
			case first <= base:
				gl.Entries = gl.Entries[:0]
			default:
				gl.Entries = gl.Entries[:first-base]
			}
		} else if gl.Snapshot != nil && first > gl.Snapshot.Index+1 {
			return fmt.Errorf("%w: group %d entries start at %d after snapshot %d", ErrCorrupt, rec.group, first, gl.Snapshot.Index)
		}
		gl.Entries = append(gl.Entries, ents...)
		sg.maxIndex = max(sg.maxIndex, ents[len(ents)-1].GetIndex())
	case recHardState:
		hs, err := decodeHardState(rec.payload)
		if err != nil {
			return err
		}
		gl.HardState = MergeHardState(gl.HardState, hs)
		sg.hs = true
		w.mu.lastHS[rec.group] = &hsInfo{hs: gl.HardState, seq: seg.seq}
	case recSnapshot:
		s, err := decodeSnapshot(rec.payload)
		if err != nil {
			return err
		}
		gl.Snapshot = s
		gl.Entries = nil
		sg.maxIndex = max(sg.maxIndex, s.Index)
	default:
		return fmt.Errorf("%w: unknown record type %d", ErrCorrupt, rec.typ)
	}
	return nil
}
