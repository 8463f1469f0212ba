package wal

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkfilepool/fsutil"
)

// current returns the segment being written, starting one if needed.
func (w *WAL) current() (*segment, error) {
	w.mu.Lock()
	n := len(w.mu.segs)
	var last *segment
	if n > 0 {
		last = w.mu.segs[n-1]
	}
	w.mu.Unlock()
	if last != nil && !last.closed && last.f != nil {
		return last, nil
	}
	return w.rollover()
}

// rollover starts the next segment, from the spare when one is ready.
func (w *WAL) rollover() (*segment, error) {
	seq := w.nextSeq
	path := filepath.Join(w.opts.Dir, fmt.Sprintf("%016x.wal", seq))
	w.waitSpare()
	w.spareMu.Lock()
	ready := w.spareReady
	w.spareReady = false
	w.spareMu.Unlock()
	if ready {
		if err := os.Rename(filepath.Join(w.opts.Dir, sparePath), path); err != nil {
			return nil, fmt.Errorf("wal: take spare segment: %w", err)
		}
		if err := fsutil.SyncDir(w.opts.Dir); err != nil {
			return nil, err
		}
	} else if err := w.getSegment(path); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("wal: open new segment: %w", err)
	}
	seg := &segment{seq: seq, path: path, f: f, groups: make(map[uint64]*segGroup)}
	w.mu.Lock()
	w.mu.segs = append(w.mu.segs, seg)
	n := len(w.mu.segs)
	w.mu.Unlock()
	w.nextSeq = seq + 1
	w.prepareSpare()
	if w.opts.OnPressure != nil {
		w.opts.OnPressure(n)
	}
	return seg, nil
}

// getSegment takes a new segment from the source. When the source has none
// (the pool is full) it does not fail the log: it recycles what it can, asks
// the owner to checkpoint, and tries again, holding back every append
// meanwhile, until it gets one or the WAL is closed. Any other error of the
// source fails the log: waiting on a failing disk would stall every append
// of the chunkserver while its leaders kept heartbeating.
func (w *WAL) getSegment(path string) error {
	backoff := 5 * time.Millisecond
	for warned := false; ; {
		err := w.opts.Source.Get(path)
		if err == nil {
			return nil
		}
		if !errors.Is(err, chunkfilepool.ErrPoolEmpty) {
			return fmt.Errorf("wal: new segment: %w", err)
		}
		w.mu.Lock()
		closed, n := w.mu.closed, len(w.mu.segs)
		w.mu.Unlock()
		if closed {
			return fmt.Errorf("wal: new segment: %w (%w)", err, ErrClosed)
		}
		if !warned {
			w.log.Warn("no segment available; appends wait for checkpoints to free one", "segments", n, "err", err)
			warned = true
		}
		if w.opts.OnPressure != nil {
			w.opts.OnPressure(n)
		}
		w.recycle()
		time.Sleep(backoff)
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

// prepareSpare fetches the next segment in the background so that a
// rollover does not wait on the pool.
func (w *WAL) prepareSpare() {
	w.spareMu.Lock()
	if w.spareReady || w.spareBusy {
		w.spareMu.Unlock()
		return
	}
	w.spareBusy = true
	w.spareMu.Unlock()
	go func() {
		err := w.opts.Source.Get(filepath.Join(w.opts.Dir, sparePath))
		w.spareMu.Lock()
		w.spareBusy = false
		w.spareReady = err == nil
		w.spareCond.Broadcast()
		w.spareMu.Unlock()
		if err != nil {
			w.log.Warn("cannot prepare a spare segment", "err", err)
		}
	}()
}

func (w *WAL) waitSpare() {
	w.spareMu.Lock()
	for w.spareBusy {
		w.spareCond.Wait()
	}
	w.spareMu.Unlock()
}

// recycle gives back the oldest segments that no group needs any more. Only
// a prefix of the log is ever recycled, so recovery never replays a record
// whose predecessors were dropped.
func (w *WAL) recycle() {
	for {
		w.mu.Lock()
		if len(w.mu.segs) < 2 {
			w.mu.Unlock()
			return
		}
		old := w.mu.segs[0]
		if !old.closed || !w.segmentDoneLocked(old) {
			w.mu.Unlock()
			return
		}
		w.mu.segs = w.mu.segs[1:]
		w.mu.Unlock()
		if err := w.opts.Source.Recycle(old.path); err != nil {
			w.log.Error("cannot recycle segment", "segment", filepath.Base(old.path), "err", err)
			return
		}
	}
}

func hardStateEqual(a, b *raftpb.HardState) bool {
	return a.GetTerm() == b.GetTerm() && a.GetVote() == b.GetVote() && a.GetCommit() == b.GetCommit()
}

// recordKind says what a durable record means for the recycling index.
type recordKind uint8

const (
	kindEntries   recordKind = iota + 1 // entries first..last
	kindHardState                       // a hard state
	kindSnapshot                        // the log restarts after a snapshot at last
	kindForget                          // every earlier record of the group is obsolete
)

// segUpdate is what one durable record changes in the recycling index.
type segUpdate struct {
	seg         *segment
	group       uint64
	kind        recordKind
	first, last uint64
	hs          *raftpb.HardState
}

// noteLocked records a durable record in the recycling index, in log order.
// Records that a later record makes obsolete stop pinning their segments:
// entries replaced by a truncating append, everything before a snapshot
// mark, everything before a forget record. w.mu held (or recovery running
// alone).
func (w *WAL) noteLocked(u segUpdate) {
	g := u.group
	if u.kind == kindForget {
		for _, s := range w.mu.segs {
			delete(s.groups, g)
		}
		delete(w.mu.ckpt, g)
		delete(w.mu.lastHS, g)
		delete(w.mu.ckptHS, g)
		delete(w.mu.lastIdx, g)
		return
	}
	sg := u.seg.groups[g]
	if sg == nil {
		sg = &segGroup{}
		u.seg.groups[g] = sg
	}
	switch u.kind {
	case kindEntries:
		if last, ok := w.mu.lastIdx[g]; ok && u.first <= last {
			w.supersedeLocked(g, u.first)
		}
		sg.maxIndex = max(sg.maxIndex, u.last)
		w.mu.lastIdx[g] = u.last
	case kindSnapshot:
		w.supersedeLocked(g, 1)
		sg.maxIndex = max(sg.maxIndex, u.last)
		w.mu.lastIdx[g] = u.last
	case kindHardState:
		sg.hs = true
		var prev *raftpb.HardState
		if li := w.mu.lastHS[g]; li != nil {
			prev = li.hs
		}
		w.mu.lastHS[g] = &hsInfo{hs: MergeHardState(prev, u.hs), seq: u.seg.seq}
	}
}

// supersedeLocked records that the group's logged entries from index from
// on were replaced: they no longer pin any segment.
func (w *WAL) supersedeLocked(g, from uint64) {
	for _, s := range w.mu.segs {
		if sg := s.groups[g]; sg != nil && sg.maxIndex >= from {
			sg.maxIndex = from - 1
		}
	}
}
