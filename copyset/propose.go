package copyset

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
)

// Proposal is a write or delete handed to the copyset. Wait returns once it
// is applied (durable on a quorum and applied on this replica) or failed.
type Proposal struct {
	id      uint64
	data    []byte
	done    chan struct{}
	index   uint64 // log index, once known (Raft worker)
	term    uint64
	once    sync.Once
	res     uint64
	err     error
	release func() // gives its bytes back to the engine's budget

	// When it was made and when Raft handed it to the apply worker as
	// committed, for Config.OnProposalApplied; committed is guarded by
	// the copyset's waiter lock.
	start, committed time.Time
}

// ProposalTimes are the stages of a proposal on its leader, from its
// proposal to its apply.
type ProposalTimes struct {
	// Commit is from the proposal to its commit: the wait for the Raft
	// worker, replication, and the quorum's WAL fdatasyncs.
	Commit time.Duration
	// Apply is from the commit to the apply: the apply queue and the
	// write into the chunk files.
	Apply time.Duration
}

func (p *Proposal) finish(index uint64, err error) {
	p.once.Do(func() {
		p.res, p.err = index, err
		close(p.done)
		if p.release != nil {
			p.release()
		}
	})
}

// Wait waits for the outcome. When ctx ends first, the outcome is unknown:
// the entry may still be applied later.
func (p *Proposal) Wait(ctx context.Context) (appliedIndex uint64, err error) {
	select {
	case <-p.done:
		return p.res, p.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// Fence is a last check of a proposal, made once the proposal holds its
// share of the byte budget and just before it is queued: it may refuse the
// proposal with an error, and the proposal is queued before the release it
// returns is called. The chunkserver checks volume epochs with it, so that
// no wait for the budget lies between its check and the queueing.
type Fence func() (release func(), err error)

// ProposeWrite hands a chunk write to the copyset's log. The caller checked
// the request; the copyset refuses when it does not lead. The data is copied.
//
// It waits while the chunkserver's proposals in flight hold their byte
// budget (Config.MaxInflightBytes): back-pressure, not an error. Then fence,
// if not nil, has its say. It never queues a proposal for a caller that
// gave up: if ctx has ended by the time the proposal would enter the
// copyset's queue, it returns ctx's error and nothing is proposed. Once it
// returned, the proposal is ordered before anything proposed to the copyset
// afterwards.
//
// req names the client's request: every replica applies a request at most
// once, so a retry of a write that was applied already succeeds without
// writing again (see ClientRequest).
func (c *Copyset) ProposeWrite(ctx context.Context, fence Fence, req ClientRequest, chunk, volume, epoch uint64, off int64, data []byte) (*Proposal, error) {
	return c.ProposeSeqWrite(ctx, fence, req, chunk, volume, epoch, Seq{}, off, data)
}

// ProposeSeqWrite is ProposeWrite for a write under the volume's sequence
// numbers: when it is applied, every replica first keeps what the volume's
// snapshots need of the data it overwrites (see ChunkStore.WriteAtSN).
func (c *Copyset) ProposeSeqWrite(ctx context.Context, fence Fence, req ClientRequest, chunk, volume, epoch uint64, seq Seq, off int64, data []byte) (*Proposal, error) {
	if int64(len(data)) > c.e.MaxWriteSize() {
		return nil, fmt.Errorf("%w: %d bytes (limit %d)", ErrTooLarge, len(data), c.e.MaxWriteSize())
	}
	if seq.Keep >= seq.SN && seq != (Seq{}) {
		return nil, fmt.Errorf("%w: newest live snapshot %d is not before the write's sequence number %d", ErrInvalidArgument, seq.Keep, seq.SN)
	}
	return c.proposeCommand(ctx, fence, &command{op: opWrite, chunk: chunk, volume: volume, epoch: epoch, offset: uint64(off), req: req, seq: seq, data: data})
}

// ProposeCloneWrite is ProposeSeqWrite for a clone's write (see
// ChunkStore.WriteClone): fill is the clone source's content of whole
// pages from fillOff, and every page data covers in part must lie in it
// (checked here, so that no replica ever finds a write it cannot apply).
// data may be empty when fill is not.
func (c *Copyset) ProposeCloneWrite(ctx context.Context, fence Fence, req ClientRequest, chunk, volume, epoch uint64, seq Seq, off int64, data, fill []byte, fillOff int64) (*Proposal, error) {
	if int64(len(data)) > c.e.MaxWriteSize() || int64(len(fill)) > c.e.MaxWriteSize()+2*c.e.cfg.CopyUnit {
		return nil, fmt.Errorf("%w: %d bytes with a fill of %d (limit %d)", ErrTooLarge, len(data), len(fill), c.e.MaxWriteSize())
	}
	if seq.Keep >= seq.SN && seq != (Seq{}) {
		return nil, fmt.Errorf("%w: newest live snapshot %d is not before the write's sequence number %d", ErrInvalidArgument, seq.Keep, seq.SN)
	}
	if err := checkFillCovers(c.e.cfg.ChunkSize, c.e.cfg.CopyUnit, off, int64(len(data)), fillOff, int64(len(fill))); err != nil {
		return nil, err
	}
	return c.proposeCommand(ctx, fence, &command{op: opWrite, clone: true, chunk: chunk, volume: volume, epoch: epoch,
		offset: uint64(off), req: req, seq: seq, data: data, fill: fill, fillOff: uint64(fillOff)})
}

// checkFillCovers checks a clone write's shape: a fill of whole pages
// inside the chunk that holds every page the data covers in part.
func checkFillCovers(chunkSize, unit, off, n, fillOff, fillLen int64) error {
	if unit <= 0 {
		return fmt.Errorf("%w: the engine knows no copy unit for clone writes", ErrInvalidArgument)
	}
	if n == 0 && fillLen == 0 {
		return fmt.Errorf("%w: a clone write with neither data nor fill", ErrInvalidArgument)
	}
	if fillLen > 0 {
		end := fillOff + fillLen
		if fillOff < 0 || fillOff%unit != 0 || end > chunkSize || (end%unit != 0 && end != chunkSize) {
			return fmt.Errorf("%w: fill [%d, %d) is not whole pages of %d bytes inside the chunk", ErrInvalidArgument, fillOff, end, unit)
		}
	}
	if n == 0 {
		return nil
	}
	for _, page := range []int64{off / unit, (off + n - 1) / unit} {
		po := page * unit
		pe := min(po+unit, chunkSize)
		if off <= po && off+n >= pe {
			continue
		}
		if po < fillOff || pe > fillOff+fillLen {
			return fmt.Errorf("%w: the write [%d, %d) covers part of page %d, and the fill [%d, %d) does not hold it",
				ErrInvalidArgument, off, off+n, page, fillOff, fillOff+fillLen)
		}
	}
	return nil
}

// ProposeCloneZero hands the copyset's log the unmap of a whole chunk of a
// clone: it is zeroed and owns every page (ChunkStore.ZeroSN), where a
// delete would make it read from the clone's source again.
func (c *Copyset) ProposeCloneZero(ctx context.Context, fence Fence, req ClientRequest, chunk, volume, epoch uint64, seq Seq) (*Proposal, error) {
	if seq.Keep >= seq.SN && seq != (Seq{}) {
		return nil, fmt.Errorf("%w: newest live snapshot %d is not before the delete's sequence number %d", ErrInvalidArgument, seq.Keep, seq.SN)
	}
	return c.proposeCommand(ctx, fence, &command{op: opDelete, clone: true, chunk: chunk, volume: volume, epoch: epoch, req: req, seq: seq})
}

// ProposeTrim hands the copyset's log a trim of a chunk's kept versions:
// live are the chunk's volume's live snapshots below bound, the volume's
// sequence number when they were listed (see ChunkStore.Trim).
func (c *Copyset) ProposeTrim(ctx context.Context, fence Fence, chunk, volume, epoch uint64, live []uint64, bound uint64) (*Proposal, error) {
	if len(live) > maxTrimLive {
		return nil, fmt.Errorf("%w: %d live snapshots (limit %d)", ErrInvalidArgument, len(live), maxTrimLive)
	}
	for _, s := range live {
		if s == 0 || s >= bound {
			return nil, fmt.Errorf("%w: live snapshot %d outside 1..%d", ErrInvalidArgument, s, bound-1)
		}
	}
	return c.proposeCommand(ctx, fence, &command{op: opTrim, chunk: chunk, volume: volume, epoch: epoch, data: encodeTrim(live, bound)})
}

// ProposeDelete hands a chunk delete to the copyset's log, as ProposeWrite.
func (c *Copyset) ProposeDelete(ctx context.Context, fence Fence, req ClientRequest, chunk, volume, epoch uint64) (*Proposal, error) {
	return c.ProposeSeqDelete(ctx, fence, req, chunk, volume, epoch, Seq{})
}

// ProposeSeqDelete is ProposeDelete for a client's delete under the
// volume's sequence numbers: a chunk a live snapshot may read is zeroed
// through copy on write instead (see ChunkStore.DeleteSN).
func (c *Copyset) ProposeSeqDelete(ctx context.Context, fence Fence, req ClientRequest, chunk, volume, epoch uint64, seq Seq) (*Proposal, error) {
	if seq.Keep >= seq.SN && seq != (Seq{}) {
		return nil, fmt.Errorf("%w: newest live snapshot %d is not before the delete's sequence number %d", ErrInvalidArgument, seq.Keep, seq.SN)
	}
	return c.proposeCommand(ctx, fence, &command{op: opDelete, chunk: chunk, volume: volume, epoch: epoch, req: req, seq: seq})
}

// proposalOverhead is what a proposal costs beyond its data: entry, message
// and bookkeeping, counted in the budget so that small writes are bounded
// too.
const proposalOverhead = 256

func (c *Copyset) proposeCommand(ctx context.Context, fence Fence, cmd *command) (*Proposal, error) {
	if !c.isLeader.Load() {
		return nil, &NotLeaderError{Leader: c.leader.Load()}
	}
	cmd.proposer = c.e.cfg.NodeID
	cmd.id = c.e.newProposalID()
	data := cmd.encode()
	release, err := c.e.reserve(ctx, int64(len(data))+proposalOverhead)
	if err != nil {
		return nil, err
	}
	p := &Proposal{id: cmd.id, data: data, done: make(chan struct{}), release: release}
	if c.e.cfg.OnProposalApplied != nil {
		p.start = time.Now()
	}
	unfence := func() {}
	if fence != nil {
		var err error
		if unfence, err = fence(); err != nil {
			release()
			return nil, err
		}
	}
	c.wmu.Lock()
	c.waiters[p.id] = p
	c.wmu.Unlock()
	var cerr error
	queued, run := c.enqueueTake(func(in *inbox) {
		// Checked under the inbox lock: a caller that gave up before its
		// proposal is queued never has it proposed, and one queued after
		// it returned comes later in the log.
		if cerr = ctx.Err(); cerr == nil {
			in.props = append(in.props, p)
		}
	})
	// The proposal is in the inbox, behind everything queued before it:
	// the fence may go. Then propose it here when no worker has the
	// copyset (enqueueTake).
	unfence()
	if run {
		c.runRaft()
	}
	switch {
	case !queued:
		c.dropWaiter(p, ErrStopped)
		return nil, ErrStopped
	case cerr != nil:
		c.dropWaiter(p, cerr)
		return nil, cerr
	}
	return p, nil
}

func (c *Copyset) dropWaiter(p *Proposal, err error) {
	c.wmu.Lock()
	delete(c.waiters, p.id)
	if p.index != 0 && c.byIndex[p.index] == p {
		delete(c.byIndex, p.index)
	}
	c.wmu.Unlock()
	p.finish(0, err)
}

// propose runs on the Raft worker.
func (c *Copyset) propose(p *Proposal) {
	if !c.isLeader.Load() {
		c.dropWaiter(p, &NotLeaderError{Leader: c.leader.Load()})
		return
	}
	if err := c.rn.Propose(p.data); err != nil {
		if errors.Is(err, raft.ErrProposalDropped) {
			err = &NotLeaderError{Leader: c.leader.Load()}
		}
		c.dropWaiter(p, err)
	}
}

// noteCommitted stamps the proposals among committed entries with the time
// of their commit (Config.OnProposalApplied); Raft worker.
func (c *Copyset) noteCommitted(ents []*raftpb.Entry) {
	if c.e.cfg.OnProposalApplied == nil || len(ents) == 0 || !c.isLeader.Load() {
		return // a follower holds no proposals of its own: no lock per commit
	}
	now := time.Now()
	c.wmu.Lock()
	for _, en := range ents {
		if p := c.byIndex[en.GetIndex()]; p != nil && p.committed.IsZero() {
			p.committed = now
		}
	}
	c.wmu.Unlock()
}

// assignIndex records where a proposal landed in the log.
func (c *Copyset) assignIndex(id, index, term uint64) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	p := c.waiters[id]
	if p == nil {
		return
	}
	p.index, p.term = index, term
	c.byIndex[index] = p
}
