package copyset

import (
	"context"
	"encoding/binary"
	"runtime"
	"time"

	"go.etcd.io/raft/v3"
)

type readWaiter struct {
	index uint64
	done  chan error
}

type readBatch struct {
	reads  []*readWaiter
	issued time.Time
}

// leaseDuration is how long after a confirmed heartbeat round the leader
// may serve reads without another: followers refuse to vote for
// ElectionTicks after hearing from a leader; two ticks are kept as margin.
func (c *Copyset) leaseDuration() time.Duration {
	return time.Duration(max(c.e.cfg.ElectionTicks-2, 1)) * c.e.cfg.TickInterval
}

// readLease is what the Raft worker publishes of a leader's read lease for
// reads that do not pass through it (see WaitReadable).
type readLease struct {
	// until is when reads stop taking the short way: a quarter of the
	// lease before its end, so that a read past it reaches the Raft
	// worker, which renews the lease while it still holds.
	until time.Time
	// applied is the index the replica must have applied: the commit index
	// when the lease was published, at or past the first entry of the
	// leader's term (everything an earlier leader acknowledged).
	applied uint64
}

// WaitReadable returns once this replica, as leader, may serve a
// linearizable read from its chunk files: its leadership is confirmed (by
// lease or a ReadIndex round) and everything acknowledged before the read
// is applied.
//
// While the lease the Raft worker published holds, that is decided here,
// without a turn of the worker: no other replica can be elected before the
// lease ends, and every write this leader acknowledged was applied here
// before its answer left, so the chunk files hold every write acknowledged
// before the read began once the replica applied what earlier leaders
// committed.
func (c *Copyset) WaitReadable(ctx context.Context) error {
	if !c.isLeader.Load() {
		return &NotLeaderError{Leader: c.leader.Load()}
	}
	if l := c.lease.Load(); l != nil && c.e.now().Before(l.until) && c.applied.Load() >= l.applied {
		select {
		case <-c.quit:
			return ErrStopped
		default:
			return nil
		}
	}
	if mustNotWait(ctx) {
		return ErrWouldWait
	}
	r := &readWaiter{done: make(chan error, 1)}
	if !c.enqueue(func(in *inbox) { in.reads = append(in.reads, r) }) {
		return ErrStopped
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

type noWaitKey struct{}

// WithoutWaiting returns a context under which the reads of a copyset
// (Read, ReadOwned, ReadSnapshot, WaitReadable) fail with ErrWouldWait
// rather than wait: for callers that must not block, such as a connection's
// reader serving a request inline, and try again elsewhere.
func WithoutWaiting(ctx context.Context) context.Context {
	return context.WithValue(ctx, noWaitKey{}, true)
}

func mustNotWait(ctx context.Context) bool {
	v, _ := ctx.Value(noWaitKey{}).(bool)
	return v
}

// Read reads a linearizable range of a chunk from the leader's chunk files.
func (c *Copyset) Read(ctx context.Context, chunk uint64, off int64, p []byte) error {
	_, err := c.readFiles(ctx, func() ([]byte, error) { return nil, c.store.ReadAt(chunk, p, off) })
	return err
}

// ReadOwned is Read for a chunk that may be a clone's: absent marks the
// pages the chunk does not own (see ChunkStore.ReadOwned).
func (c *Copyset) ReadOwned(ctx context.Context, chunk uint64, off int64, p []byte) (absent []byte, err error) {
	return c.readFiles(ctx, func() ([]byte, error) { return c.store.ReadOwned(chunk, p, off) })
}

// ReadSnapshot reads a range of a chunk as it was at the end of sequence
// number snap (a snapshot of its volume), from the leader, as Read; absent
// marks the pages that read from a clone's source then (ReadOwnedSN).
func (c *Copyset) ReadSnapshot(ctx context.Context, chunk uint64, off int64, p []byte, snap uint64) (absent []byte, err error) {
	return c.readFiles(ctx, func() ([]byte, error) { return c.store.ReadOwnedSN(chunk, p, off, snap) })
}

// readFiles runs read against the chunk files once the replica may serve a
// linearizable read (WaitReadable), and never while the files may show the
// past: from the moment a chunk's fdatasync failed (the file may be back at
// its last synced state) until they are rewritten from the log, which takes
// them back to the last checkpoint and forward again (see
// checkpointLocked). A read under way when that began discards what it read
// and waits as well; the store never lets a read overlap the fdatasync
// itself. A replica that failed meanwhile serves nothing.
func (c *Copyset) readFiles(ctx context.Context, read func() ([]byte, error)) ([]byte, error) {
	for {
		if err := c.WaitReadable(ctx); err != nil {
			return nil, err
		}
		if done := c.rewriting.Load(); done != nil {
			if mustNotWait(ctx) {
				return nil, ErrWouldWait
			}
			select {
			case <-*done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			continue
		}
		if !c.filesMu.TryRLock() {
			if mustNotWait(ctx) {
				return nil, ErrWouldWait
			}
			runtime.Gosched() // a hold is being taken, or just ended
			continue
		}
		if !c.isLeader.Load() {
			c.filesMu.RUnlock()
			return nil, &NotLeaderError{Leader: c.leader.Load()}
		}
		out, err := read()
		// Marked while this read ran: it may have read the past.
		past := c.rewriting.Load() != nil
		c.filesMu.RUnlock()
		if !past {
			return out, err
		}
	}
}

// startReads runs on the Raft worker; active tells whether the round holds
// work that wakes a quiesced group (inbox.active). Under the lease, reads
// are served and, past half of it (reads reach the worker in its last
// quarter), the lease is renewed: by a round of quiesce heartbeats out of
// turn when the group stays quiesced (beatlease.go), else by ReadIndex.
// Without it, the group wakes and reads wait for ReadIndex.
func (c *Copyset) startReads(reads []*readWaiter, active bool) {
	st := c.rn.BasicStatus()
	if st.RaftState != raft.StateLeader {
		for _, r := range reads {
			r.done <- &NotLeaderError{Leader: st.Lead}
		}
		return
	}
	now := c.e.now()
	quiesced := c.quiesced.Load() && !active
	if c.leaseHolds(st, now) {
		for _, r := range reads {
			c.waitApplied(st.GetCommit(), r)
		}
		if c.leaseUntil.Sub(now) < c.leaseDuration()/2 {
			if quiesced {
				c.renewByBeats(now)
			} else if !c.renewing {
				c.issueReadIndex(nil, now)
			}
		}
		c.publishLease(st, now)
		return
	}
	if quiesced {
		// ReadIndex's heartbeats wake the followers: the leader wakes too.
		c.quiesced.Store(false)
		c.idleTicks = 0
	}
	c.issueReadIndex(reads, now)
}

// leaseHolds reports whether the leader may serve reads under its lease:
// it holds, no transfer of leadership runs, and the leader committed an
// entry of its own term. Raft worker only.
//
// Once a transfer told its target to campaign, no lease holds for the rest
// of the term: Raft may give the transfer up and the leader take a lease
// again while the target's MsgTimeoutNow is still on its way, and the
// target's election ignores the voters' leases.
func (c *Copyset) leaseHolds(st raft.BasicStatus, now time.Time) bool {
	return st.RaftState == raft.StateLeader && now.Before(c.leaseUntil) && st.LeadTransferee == 0 &&
		c.termStart != 0 && st.GetCommit() >= c.termStart && st.GetTerm() != c.transferTerm
}

// publishLease publishes the lease for WaitReadable's short way, or takes
// it back when it does not hold. Raft worker only.
//
// The short way ends a quarter of a lease before the lease does, so that a
// read past it reaches the worker, which renews the lease while it still
// holds. (Where the short way ends is a matter of liveness only: a read
// that saw the lease hold saw no other leader elected before it began.)
func (c *Copyset) publishLease(st raft.BasicStatus, now time.Time) {
	until := c.leaseUntil.Add(-c.leaseDuration() / 4)
	if !c.leaseHolds(st, now) || !now.Before(until) {
		c.lease.Store(nil)
		return
	}
	c.lease.Store(&readLease{until: until, applied: st.GetCommit()})
}

func (c *Copyset) issueReadIndex(reads []*readWaiter, now time.Time) {
	c.readSeq++
	var ctx [8]byte
	binary.LittleEndian.PutUint64(ctx[:], c.readSeq)
	c.readBatches[c.readSeq] = &readBatch{reads: reads, issued: now}
	if reads == nil {
		c.renewing = true
	}
	c.rn.ReadIndex(ctx[:])
}

func (c *Copyset) readIndexDone(rs raft.ReadState) {
	if len(rs.RequestCtx) != 8 {
		return
	}
	seq := binary.LittleEndian.Uint64(rs.RequestCtx)
	b := c.readBatches[seq]
	if b == nil {
		return
	}
	delete(c.readBatches, seq)
	if b.reads == nil {
		c.renewing = false
	}
	// A quorum acknowledged a heartbeat sent after b.issued: no other leader
	// can be elected before b.issued plus the lease duration.
	st := c.rn.BasicStatus()
	if until := b.issued.Add(c.leaseDuration()); until.After(c.leaseUntil) && st.LeadTransferee == 0 {
		c.leaseUntil = until
		c.publishLease(st, c.e.now())
	}
	for _, r := range b.reads {
		c.waitApplied(rs.Index, r)
	}
}

// expireReads fails read batches Raft could not confirm within two election
// timeouts (their heartbeats were lost); Raft worker only.
func (c *Copyset) expireReads() {
	limit := 2 * time.Duration(c.e.cfg.ElectionTicks) * c.e.cfg.TickInterval
	for seq, b := range c.readBatches {
		if c.e.now().Sub(b.issued) > limit {
			delete(c.readBatches, seq)
			if b.reads == nil {
				c.renewing = false
			}
			for _, r := range b.reads {
				r.done <- ErrReadTimeout
			}
		}
	}
}

func (c *Copyset) failReadBatches(err error) {
	for seq, b := range c.readBatches {
		delete(c.readBatches, seq)
		for _, r := range b.reads {
			r.done <- err
		}
	}
	c.renewing = false
}

func (c *Copyset) waitApplied(index uint64, r *readWaiter) {
	if c.applied.Load() >= index {
		r.done <- nil
		return
	}
	r.index = index
	c.wmu.Lock()
	c.readWait = append(c.readWait, r)
	c.wmu.Unlock()
	// The apply worker may have advanced past index meanwhile.
	c.releaseReads()
}

func (c *Copyset) releaseReads() {
	applied := c.applied.Load()
	c.wmu.Lock()
	kept := c.readWait[:0]
	for _, r := range c.readWait {
		if r.index <= applied {
			r.done <- nil
		} else {
			kept = append(kept, r)
		}
	}
	c.readWait = kept
	c.wmu.Unlock()
}
