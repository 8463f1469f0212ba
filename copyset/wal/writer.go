package wal

import (
	"errors"
	"fmt"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sys/unix"
)

// run is the writer goroutine: it drains the queue into group commits and
// recycles segments when idle.
func (w *WAL) run() {
	defer close(w.stopped)
	for {
		w.mu.Lock()
		for len(w.mu.queue) == 0 && !w.mu.closed {
			w.mu.Unlock()
			w.recycle()
			<-w.wake
			w.mu.Lock()
		}
		batch := w.mu.queue
		w.mu.queue = nil
		closing, crashed := w.mu.closed, w.mu.crashed
		w.mu.Unlock()
		if crashed {
			for _, r := range batch {
				r.done(ErrClosed)
			}
			return
		}
		if len(batch) > 0 && !w.commit(batch) {
			return
		}
		w.recycle()
		if closing {
			w.mu.Lock()
			rest := w.mu.queue
			w.mu.queue = nil
			w.mu.Unlock()
			for _, r := range rest {
				r.done(ErrClosed)
			}
			return
		}
	}
}

// commit writes a batch in group commits of at most MaxBatchBytes and calls
// the callbacks. It reports false when the WAL can take no more writes.
func (w *WAL) commit(batch []request) bool {
	for len(batch) > 0 {
		n, size := 0, 0
		for n < len(batch) && (n == 0 || size < w.opts.MaxBatchBytes) {
			size += requestSize(batch[n].a)
			n++
		}
		err := w.writeBatch(batch[:n])
		for _, r := range batch[:n] {
			r.done(err)
		}
		if err != nil {
			if !errors.Is(err, ErrClosed) {
				w.log.Error("write-ahead log failed; refusing further appends", "err", err)
			}
			w.mu.Lock()
			w.mu.closed = true
			rest := w.mu.queue
			w.mu.queue = nil
			w.mu.Unlock()
			for _, r := range batch[n:] {
				r.done(err)
			}
			for _, r := range rest {
				r.done(err)
			}
			return false
		}
		batch = batch[n:]
	}
	return true
}

func requestSize(a Append) int {
	n := 0
	if a.Snapshot != nil {
		n += recordHeaderSize + 64
	}
	if len(a.Entries) > 0 {
		n += recordHeaderSize + entriesPayloadSize(a.Entries)
	}
	if a.HardState != nil {
		n += recordHeaderSize + 24
	}
	return n
}

// pending is one segment's share of a group commit.
type pending struct {
	seg *segment
	off int64
	buf []byte
}

// segUpdate is index bookkeeping applied once a batch is durable.
type segUpdate struct {
	seg      *segment
	group    uint64
	maxIndex uint64
	hs       *raftpb.HardState
}

func (w *WAL) writeBatch(batch []request) error {
	cur, err := w.current()
	if err != nil {
		return err
	}
	var parts []pending
	part := &pending{seg: cur, off: cur.writeOff, buf: w.buf[:0]}
	if cur.writeOff == 0 {
		part.buf = append(part.buf, make([]byte, headerBlockSize)...)
		encodeSegmentHeader(part.buf, cur.seq)
	}
	var updates []segUpdate
	entries := 0
	fits := func(n int) bool {
		// Always leave room for the end-of-segment record.
		return part.off+int64(len(part.buf))+int64(recordHeaderSize+n+recordHeaderSize) <= w.fileSize
	}
	emit := func(typ byte, group uint64, payload []byte, u segUpdate) error {
		if !fits(len(payload)) {
			part.buf = appendRecord(part.buf, part.seg.seq, recEndSegment, 0, nil)
			parts = append(parts, *part)
			next, err := w.rollover()
			if err != nil {
				return err
			}
			part = &pending{seg: next, buf: make([]byte, headerBlockSize, headerBlockSize+len(payload)+2*recordHeaderSize)}
			encodeSegmentHeader(part.buf, next.seq)
			if !fits(len(payload)) {
				return fmt.Errorf("wal: record of %d bytes does not fit in a segment of %d", len(payload), w.fileSize)
			}
		}
		part.buf = appendRecord(part.buf, part.seg.seq, typ, group, payload)
		u.seg, u.group = part.seg, group
		updates = append(updates, u)
		return nil
	}
	var scratch []byte
	limit := int(w.fileSize/4) - recordHeaderSize
	for _, r := range batch {
		a := r.a
		if a.Snapshot != nil {
			p, err := appendSnapshotPayload(scratch[:0], a.Snapshot)
			if err != nil {
				return err
			}
			if err := emit(recSnapshot, a.Group, p, segUpdate{maxIndex: a.Snapshot.Index}); err != nil {
				return err
			}
			scratch = p
		}
		// Split long entry lists so that every record fits a segment.
		for ents := a.Entries; len(ents) > 0; {
			k, sz := 0, 4
			for k < len(ents) {
				esz := 21 + len(ents[k].GetData())
				if k > 0 && sz+esz > limit {
					break
				}
				sz += esz
				k++
			}
			p := appendEntriesPayload(scratch[:0], ents[:k])
			if err := emit(recEntries, a.Group, p, segUpdate{maxIndex: ents[k-1].GetIndex()}); err != nil {
				return err
			}
			scratch = p
			entries += k
			ents = ents[k:]
		}
		if a.HardState != nil {
			p := appendHardStatePayload(scratch[:0], a.HardState)
			if err := emit(recHardState, a.Group, p, segUpdate{hs: a.HardState}); err != nil {
				return err
			}
			scratch = p
		}
	}
	parts = append(parts, *part)
	w.buf = part.buf[:0]

	written := 0
	for _, p := range parts {
		if _, err := p.seg.f.WriteAt(p.buf, p.off); err != nil {
			return fmt.Errorf("wal: write segment %016x: %w", p.seg.seq, err)
		}
		p.seg.writeOff = p.off + int64(len(p.buf))
		written += len(p.buf)
	}
	w.mu.Lock()
	crashed, keep := w.mu.crashed, w.mu.keep
	w.mu.Unlock()
	if crashed {
		// Power lost between the write and the sync: keep a torn prefix.
		tear := int64(float64(written) * keep)
		for _, p := range parts {
			n := int64(len(p.buf))
			if tear >= n {
				tear -= n
				continue
			}
			_, _ = p.seg.f.WriteAt(make([]byte, n-tear), p.off+tear)
			_ = unix.Fdatasync(int(p.seg.f.Fd()))
			tear = 0
		}
		return ErrClosed
	}
	start := time.Now()
	for _, p := range parts {
		if err := unix.Fdatasync(int(p.seg.f.Fd())); err != nil {
			return fmt.Errorf("wal: sync segment %016x: %w", p.seg.seq, err)
		}
		p.seg.syncedOff = p.seg.writeOff
	}
	elapsed := time.Since(start)

	w.mu.Lock()
	for _, u := range updates {
		sg := u.seg.groups[u.group]
		if sg == nil {
			sg = &segGroup{}
			u.seg.groups[u.group] = sg
		}
		sg.maxIndex = max(sg.maxIndex, u.maxIndex)
		if u.hs != nil {
			sg.hs = true
			if !w.mu.forgot[u.group] {
				var prev *raftpb.HardState
				if li := w.mu.lastHS[u.group]; li != nil {
					prev = li.hs
				}
				w.mu.lastHS[u.group] = &hsInfo{hs: MergeHardState(prev, u.hs), seq: u.seg.seq}
			}
		}
	}
	for _, p := range parts[:len(parts)-1] {
		// Finished segments are reopened by recovery; free their files.
		p.seg.closed = true
		p.seg.f.Close()
		p.seg.f = nil
	}
	w.mu.Unlock()
	if w.opts.OnSync != nil {
		w.opts.OnSync(SyncInfo{Duration: elapsed, Entries: entries, Groups: len(batch), Bytes: written})
	}
	return nil
}
