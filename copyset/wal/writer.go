package wal

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// run is the writer goroutine: it drains the queue into group commits and
// recycles segments when idle. It commits holding commitMu, which an
// inline committer (TryCommit) holds instead while it writes.
func (w *WAL) run() {
	defer close(w.stopped)
	for {
		w.mu.Lock()
		for len(w.mu.queue) == 0 && !w.mu.closed {
			w.mu.Unlock()
			w.commitMu.Lock()
			w.recycle()
			w.commitMu.Unlock()
			<-w.wake
			w.mu.Lock()
		}
		w.mu.Unlock()
		// Let the goroutines that are ready to run go first. The Raft
		// rounds of other copysets, woken by the same burst of messages as
		// the append that woke this writer, then queue their appends in
		// time for this batch rather than the next (a yield costs about a
		// microsecond when nothing else is ready).
		runtime.Gosched()
		w.commitMu.Lock()
		// Taken under commitMu: batches are written in the order they
		// left the queue, whoever writes them.
		w.mu.Lock()
		batch := w.mu.queue
		w.mu.queue = nil
		closing := w.mu.closed
		w.mu.Unlock()
		ok := len(batch) == 0 || w.commit(batch)
		if ok && !w.failed {
			w.recycle()
		}
		w.commitMu.Unlock()
		if !ok {
			return
		}
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
			w.failed = true
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
	if a.Forget {
		n += recordHeaderSize
	}
	if a.Snapshot != nil {
		n += recordHeaderSize + 76 + len(a.Snapshot.Requests)
	}
	if len(a.Entries) > 0 {
		n += recordHeaderSize + entriesPayloadSize(a.Entries)
	}
	if a.HardState != nil {
		n += recordHeaderSize + 24
	}
	return n
}

// batchWriter writes one group commit: records go into a buffer for the
// current segment, and the buffer is written and fdatasynced whenever a
// segment is finished (so a segment is durable, end record included, before
// the next one's header is written) or the buffer would exceed the torn
// window (so an interrupted write never spans more than that). Recovery
// relies on both.
//
// buf starts at a page boundary of the segment whenever the bytes of the
// log before the write offset in that page are known (seg.tail): it then
// begins with those bytes again (pre of them), so that every write covers
// whole pages and can go around the page cache (direct.go). Writing them
// again is what the page cache's writeback did anyway: it writes whole
// pages.
type batchWriter struct {
	w       *WAL
	seg     *segment
	off     int64 // where buf[0] goes in seg; off+len(buf) is the end of the log
	buf     []byte
	pre     int // leading bytes of buf already in the segment
	updates []segUpdate
	written int
	synced  time.Duration
	closed  []*segment // segments finished by this batch
}

func (b *batchWriter) fits(n int) bool {
	// Always leave room for the end-of-segment record.
	return b.off+int64(len(b.buf))+int64(recordHeaderSize+n+recordHeaderSize) <= b.w.fileSize
}

// zeroPage pads writes to a page boundary.
var zeroPage [pageSize]byte

// flush writes and syncs the buffer.
func (b *batchWriter) flush() error {
	if len(b.buf) == b.pre {
		return nil
	}
	seg := b.seg
	// Write whole pages: the segment's pages are not in the page cache
	// (the pool drops them after formatting), and a buffered write that
	// ends inside a page makes the kernel read that page from the disk
	// first, which costs about as much as the fdatasync; a direct write
	// must cover whole pages. The padding is zeros, what the segment holds
	// past its last record anyway; the next write starts with the bytes
	// this one wrote into its last page (b.pre).
	n := len(b.buf)
	end := b.off + int64(n)
	if pad := min(-end&(pageSize-1), b.w.fileSize-end); pad > 0 {
		b.buf = append(b.buf, zeroPage[:pad]...)
	}
	if k := b.w.opts.TestingKnobs.BeforeWrite; k != nil {
		k(seg.seq, b.off, len(b.buf))
	}
	err := writeSegment(seg, b.buf, b.off)
	b.written += n - b.pre
	b.buf = b.buf[:n]
	if err != nil {
		return fmt.Errorf("wal: write segment %016x: %w", seg.seq, err)
	}
	start := time.Now()
	if err := unix.Fdatasync(int(seg.f.Fd())); err != nil {
		return fmt.Errorf("wal: sync segment %016x: %w", seg.seq, err)
	}
	b.synced += time.Since(start)
	end = b.off + int64(n)
	seg.writeOff, seg.syncedOff = end, end
	// Keep the start of the page the log now ends in: the next write
	// begins with it. (Unless this write began inside that page without
	// its start: then the next one is not page aligned either.)
	if k := int(end % pageSize); k <= n {
		copy(b.buf, b.buf[n-k:n])
		b.buf, b.pre, b.off = b.buf[:k], k, end-int64(k)
	} else {
		b.buf, b.pre, b.off = b.buf[:0], 0, end
	}
	return nil
}

// emit adds one record, finishing the segment first when it does not fit.
func (b *batchWriter) emit(typ byte, group uint64, payload []byte, u segUpdate) error {
	return b.emitWith(typ, group, len(payload), func(buf []byte) []byte { return append(buf, payload...) }, u)
}

// emitWith is emit of a payload of size bytes that fill appends in place.
func (b *batchWriter) emitWith(typ byte, group uint64, size int, fill func([]byte) []byte, u segUpdate) error {
	if !b.fits(size) {
		b.buf = appendRecord(b.buf, b.seg.seq, recEndSegment, 0, nil)
		if err := b.flush(); err != nil {
			return err
		}
		b.closed = append(b.closed, b.seg)
		next, err := b.w.rollover()
		if err != nil {
			return err
		}
		b.seg, b.off, b.pre = next, 0, 0
		b.buf = append(b.buf[:0], make([]byte, headerBlockSize)...)
		encodeSegmentHeader(b.buf, next.seq)
		if !b.fits(size) {
			return fmt.Errorf("wal: record of %d bytes does not fit in a segment of %d", size, b.w.fileSize)
		}
	}
	if int64(len(b.buf)+recordHeaderSize+size) > b.w.tornWindow() {
		if err := b.flush(); err != nil {
			return err
		}
	}
	b.buf = appendRecordWith(b.buf, b.seg.seq, typ, group, size, fill)
	u.seg, u.group = b.seg, group
	b.updates = append(b.updates, u)
	return nil
}

func (w *WAL) writeBatch(batch []request) error {
	cur, err := w.current()
	if err != nil {
		return err
	}
	b := &batchWriter{w: w, seg: cur, off: cur.writeOff, buf: w.buf[:0]}
	if k := int(cur.writeOff % pageSize); k != 0 && len(cur.tail) == k {
		b.buf = append(b.buf, cur.tail...)
		b.off, b.pre = cur.writeOff-int64(k), k
	}
	if cur.writeOff == 0 {
		b.buf = append(b.buf, make([]byte, headerBlockSize)...)
		encodeSegmentHeader(b.buf, cur.seq)
	}
	entries := 0
	var scratch []byte
	limit := int(w.fileSize/4) - recordHeaderSize
	for _, r := range batch {
		a := r.a
		if a.Forget {
			if err := b.emit(recForget, a.Group, nil, segUpdate{kind: kindForget}); err != nil {
				return err
			}
		}
		if a.Snapshot != nil {
			p, err := appendSnapshotPayload(scratch[:0], a.Snapshot)
			if err != nil {
				return err
			}
			if err := b.emit(recSnapshotEpoch, a.Group, p, segUpdate{kind: kindSnapshot, last: a.Snapshot.Index}); err != nil {
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
			some := ents[:k]
			u := segUpdate{kind: kindEntries, first: ents[0].GetIndex(), last: ents[k-1].GetIndex()}
			if err := b.emitWith(recEntries, a.Group, sz, func(buf []byte) []byte { return appendEntriesPayload(buf, some) }, u); err != nil {
				return err
			}
			entries += k
			ents = ents[k:]
		}
		if a.HardState != nil {
			p := appendHardStatePayload(scratch[:0], a.HardState)
			if err := b.emit(recHardState, a.Group, p, segUpdate{kind: kindHardState, hs: a.HardState}); err != nil {
				return err
			}
			scratch = p
		}
	}
	if err := b.flush(); err != nil {
		return err
	}
	b.seg.tail = append(b.seg.tail[:0], b.buf[:b.pre]...)
	w.buf = b.buf[:0]
	if !fsutil.Aligned(w.buf) {
		// Grown by append into memory that is not page aligned: later
		// writes would all go through the page cache.
		w.buf = fsutil.AlignedBuffer(cap(w.buf))[:0]
	}

	w.mu.Lock()
	for _, u := range b.updates {
		w.noteLocked(u)
	}
	for _, seg := range b.closed {
		// Finished segments are reopened by recovery; free their files.
		seg.closed = true
		seg.closeFiles()
	}
	w.mu.Unlock()
	// A batch that wrote nothing (appends carrying only a commit index,
	// which is not logged) did not sync.
	if b.written > 0 {
		// Appends carrying only a commit index wrote nothing: they do
		// not make the log busy (TryCommit).
		w.lastCommit = time.Now()
	}
	if w.opts.OnSync != nil && b.written > 0 {
		w.opts.OnSync(SyncInfo{Duration: b.synced, Entries: entries, Groups: len(batch), Bytes: b.written, Inline: w.inline})
	}
	return nil
}
