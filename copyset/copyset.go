package copyset

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"
	"go.etcd.io/raft/v3/tracker"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/copyset/wal"
)

// Copyset is one replica of a copyset: a Raft group whose state machine is a
// set of chunk files. Its methods are safe for concurrent use.
//
// No goroutine belongs to a copyset. Everything that touches its RawNode
// runs on one of the engine's Raft workers, one worker at a time; entries are
// applied by the engine's apply workers, again one at a time per copyset.
// Other goroutines hand work over through the copyset's inbox.
type Copyset struct {
	e      *Engine
	id     GroupID
	dir    string
	store  ChunkStore
	wal    walAppender
	ownWAL *wal.WAL // set with Config.PerCopysetWAL
	log    *slog.Logger

	storage *raft.MemoryStorage
	rn      *raft.RawNode // Raft worker only

	// durableHS is the latest hard state made durable by the WAL; the
	// checkpoint records it (MemoryStorage's own copy is not safe to read
	// from another goroutine).
	hsMu      sync.Mutex
	durableHS *raftpb.HardState

	initialVoters []uint64

	mu      sync.Mutex // guards in, sched, stopped
	in      inbox
	sched   schedFlags
	stopped bool

	// Raft worker state.
	termStart   uint64 // index of the current leader term's first entry
	knownLead   uint64 // last non-zero leader seen, for logging leader changes
	leaseUntil  time.Time
	readSeq     uint64
	readBatches map[uint64]*readBatch
	renewing    bool
	snapSending map[uint64]uint64 // peer -> snapshot index being sent
	pending     *PendingChange    // membership change proposed here, not yet applied

	// Published state.
	leader    atomic.Uint64
	isLeader  atomic.Bool
	term      atomic.Uint64
	applied   atomic.Uint64
	confEpoch atomic.Uint64
	// conf epoch at the index of the log storage's snapshot (sent with it)
	snapConfEpoch atomic.Uint64
	installing    atomic.Bool
	installEpoch  uint64 // conf epoch of the snapshot being installed; smMu
	applyErrs     atomic.Uint64

	// Apply side.
	amu     sync.Mutex // guards applyQ, asched
	applyQ  []applyItem
	asched  schedFlags
	smMu    sync.Mutex // held while the state machine changes (apply, install, checkpoint)
	sm      smState    // guarded by smMu
	ckptReq atomic.Bool

	// Waiters.
	wmu      sync.Mutex
	waiters  map[uint64]*Proposal // by proposal id
	byIndex  map[uint64]*Proposal // by log index, once known
	waitTerm uint64               // highest term seen by settleWaiters
	readWait []*readWaiter
}

// smState is the state machine's bookkeeping, guarded by smMu.
type smState struct {
	applied      uint64
	appliedTerm  uint64
	confState    *raftpb.ConfState
	confEpoch    uint64
	lastCkpt     uint64
	lastCkptTime time.Time
	bytesSince   uint64 // command bytes applied since the last checkpoint
	// installed is the index of the last snapshot whose chunk files were
	// installed completely: data entries at or below it are skipped.
	installed uint64
}

type inbox struct {
	appended []appendDone
	local    []*raftpb.Message
	msgs     []*raftpb.Message
	calls    []func()
	ticks    int
	props    []*Proposal
	reads    []*readWaiter
}

type appendDone struct {
	m   *raftpb.Message
	err error
}

type applyItem struct {
	m    *raftpb.Message  // MsgStorageApply
	snap *raftpb.Snapshot // a snapshot persisted by the append path
	ckpt bool             // checkpoint request without entries
}

// open recovers a copyset from its directory and its WAL records.
func (e *Engine) open(id GroupID, dir string, gl *wal.GroupLog) (*Copyset, error) {
	m, err := readMeta(dir)
	if err != nil {
		return nil, err
	}
	c := &Copyset{
		e:           e,
		id:          id,
		dir:         dir,
		log:         e.log.With("copyset", id.String()),
		storage:     raft.NewMemoryStorage(),
		readBatches: make(map[uint64]*readBatch),
		snapSending: make(map[uint64]uint64),
		waiters:     make(map[uint64]*Proposal),
		byIndex:     make(map[uint64]*Proposal),
	}
	c.initialVoters = append([]uint64(nil), m.Voters...)
	if e.cfg.PerCopysetWAL {
		w, logs, err := wal.Open(wal.Options{
			Dir: filepath.Join(dir, "wal"), Source: e.cfg.Segments, OnSync: e.cfg.OnWALSync, Logger: e.cfg.Logger,
			OnPressure: func(n int) {
				if n > 2 {
					c.requestCheckpoint()
				}
			},
		})
		if err != nil {
			return nil, err
		}
		c.ownWAL, c.wal, gl = w, w, logs[uint64(id)]
	} else {
		c.wal = e.wal
	}
	fail := func(err error) (*Copyset, error) {
		if c.ownWAL != nil {
			c.ownWAL.Close()
		}
		if c.store != nil {
			c.store.Close()
		}
		return nil, err
	}
	c.store, err = e.cfg.OpenStore(filepath.Join(dir, "chunks"))
	if err != nil {
		return fail(fmt.Errorf("open chunk store: %w", err))
	}

	base := &wal.SnapshotMark{Index: m.Applied, Term: m.AppliedTerm, ConfState: m.confState()}
	confEpoch := m.ConfEpoch
	if gl != nil && gl.Snapshot != nil && gl.Snapshot.Index > base.Index {
		// A snapshot install finished (its files were synced before its
		// WAL record) but the meta file was not rewritten yet.
		base = gl.Snapshot
	}
	var hs *raftpb.HardState
	if gl != nil {
		hs = gl.HardState
	}
	hs = wal.MergeHardState(m.hardState(), hs)
	var ents []*raftpb.Entry
	if gl != nil {
		for _, en := range gl.Entries {
			if en.GetIndex() > base.Index {
				ents = append(ents, en)
			}
		}
		// The entries must continue the base without a gap, and a suffix
		// older than the base (left from before an install) is stale.
		if len(ents) > 0 && (ents[0].GetIndex() != base.Index+1 || ents[0].GetTerm() < base.Term) {
			c.log.Warn("discarding log entries that do not follow the checkpoint",
				"checkpoint", base.Index, "first", ents[0].GetIndex(), "term", ents[0].GetTerm())
			ents = nil
		}
	}
	if base.Index > 0 {
		snap := &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: &base.Index, Term: &base.Term, ConfState: base.ConfState}}
		if err := c.storage.ApplySnapshot(snap); err != nil {
			return fail(fmt.Errorf("restore snapshot: %w", err))
		}
	}
	if len(ents) > 0 {
		if err := c.storage.Append(ents); err != nil {
			return fail(fmt.Errorf("restore entries: %w", err))
		}
	}
	last, _ := c.storage.LastIndex()
	commit := min(max(hs.GetCommit(), base.Index), last)
	hs.Commit = &commit
	if err := c.storage.SetHardState(hs); err != nil {
		return fail(fmt.Errorf("restore hard state: %w", err))
	}
	c.durableHS = hs
	c.sm = smState{
		applied: base.Index, appliedTerm: base.Term, confState: base.ConfState, confEpoch: confEpoch,
		lastCkpt: base.Index, lastCkptTime: time.Now(),
	}
	c.snapConfEpoch.Store(confEpoch)
	c.applied.Store(base.Index)
	c.confEpoch.Store(confEpoch)
	rn, err := raft.NewRawNode(&raft.Config{
		ID:                        e.cfg.NodeID,
		ElectionTick:              e.cfg.ElectionTicks,
		HeartbeatTick:             e.cfg.HeartbeatTicks,
		Storage:                   c.storage,
		Applied:                   base.Index,
		AsyncStorageWrites:        true,
		MaxSizePerMsg:             1 << 20,
		MaxCommittedSizePerReady:  8 << 20,
		MaxUncommittedEntriesSize: 64 << 20,
		MaxInflightMsgs:           256,
		CheckQuorum:               true,
		PreVote:                   true,
		ReadOnlyOption:            raft.ReadOnlySafe,
		DisableProposalForwarding: true,
		Logger:                    raftLogger{c.log},
	})
	if err != nil {
		return fail(fmt.Errorf("start raft: %w", err))
	}
	c.rn = rn
	c.wal.SetCheckpoint(uint64(id), base.Index, m.hardState())
	return c, nil
}

// ID is the copyset's id.
func (c *Copyset) ID() GroupID { return c.id }

// Store is the copyset's chunk store (for hashes and diagnosis; writes must
// go through the copyset).
func (c *Copyset) Store() ChunkStore { return c.store }

// IsLeader reports whether this replica leads the copyset right now.
func (c *Copyset) IsLeader() bool { return c.isLeader.Load() }

// Leader is the leader's node id as this replica knows it (0 if unknown).
func (c *Copyset) Leader() uint64 { return c.leader.Load() }

// AppliedIndex is the index of the last entry applied to the chunk files.
func (c *Copyset) AppliedIndex() uint64 { return c.applied.Load() }

// ConfEpoch is the log index of the last applied membership change.
func (c *Copyset) ConfEpoch() uint64 { return c.confEpoch.Load() }

// ------------------------------------------------------------------ inbox

// enqueue runs f under the inbox lock and schedules the copyset.
func (c *Copyset) enqueue(f func(in *inbox)) bool {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return false
	}
	f(&c.in)
	push := c.sched.signal()
	c.mu.Unlock()
	if push {
		c.e.raftQ.push(c)
	}
	return true
}

func (c *Copyset) deliver(m *raftpb.Message) {
	c.enqueue(func(in *inbox) { in.msgs = append(in.msgs, m) })
}

func (c *Copyset) tick() { c.enqueue(func(in *inbox) { in.ticks++ }) }

// call runs f on the Raft worker with the RawNode at hand.
func (c *Copyset) call(f func()) bool {
	return c.enqueue(func(in *inbox) { in.calls = append(in.calls, f) })
}

// callWait runs f on the Raft worker and waits for it.
func (c *Copyset) callWait(ctx context.Context, f func()) error {
	done := make(chan struct{})
	if !c.call(func() { f(); close(done) }) {
		return ErrStopped
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.e.stopped:
		return ErrStopped
	}
}

func (c *Copyset) stop() {
	c.mu.Lock()
	c.stopped = true
	c.in = inbox{}
	c.mu.Unlock()
	c.wmu.Lock()
	for id, p := range c.waiters {
		p.finish(0, ErrStopped)
		delete(c.waiters, id)
	}
	c.byIndex = map[uint64]*Proposal{}
	for _, r := range c.readWait {
		r.done <- ErrStopped
	}
	c.readWait = nil
	c.wmu.Unlock()
}

// runRaft processes everything in the inbox and handles the Ready states it
// produces. It runs on a Raft worker.
func (c *Copyset) runRaft() {
	c.mu.Lock()
	c.sched.begin()
	in := c.in
	c.in = inbox{}
	stopped := c.stopped
	c.mu.Unlock()
	if !stopped {
		c.process(&in)
	}
	c.mu.Lock()
	again := c.sched.end()
	c.mu.Unlock()
	if again {
		c.e.raftQ.push(c)
	}
}

func (c *Copyset) process(in *inbox) {
	rn := c.rn
	for _, a := range in.appended {
		c.finishAppend(a)
	}
	for _, m := range in.local {
		_ = rn.Step(m)
	}
	for _, m := range in.msgs {
		_ = rn.Step(m)
	}
	for _, f := range in.calls {
		f()
	}
	for i := 0; i < min(in.ticks, 3); i++ {
		rn.Tick()
	}
	if in.ticks > 0 {
		c.expireReads()
	}
	for _, p := range in.props {
		c.propose(p)
	}
	if len(in.reads) > 0 {
		c.startReads(in.reads)
	}
	for rn.HasReady() {
		c.handleReady(rn.Ready())
	}
}

// finishAppend runs once the WAL made a MsgStorageAppend durable: it updates
// the in-memory log and delivers the responses the write was holding back.
func (c *Copyset) finishAppend(a appendDone) {
	if a.err != nil {
		if !errors.Is(a.err, wal.ErrClosed) {
			c.log.Error("write-ahead log append failed; copyset stalls", "err", a.err)
		}
		return
	}
	m := a.m
	if s := m.GetSnapshot(); s != nil && !raft.IsEmptySnap(s) {
		if err := c.storage.ApplySnapshot(s); err != nil && !errors.Is(err, raft.ErrSnapOutOfDate) {
			c.log.Error("apply snapshot to log storage", "err", err)
			return
		}
		c.pushApply(applyItem{snap: s})
	}
	if len(m.GetEntries()) > 0 {
		if err := c.storage.Append(m.GetEntries()); err != nil {
			c.log.Error("append to log storage", "err", err)
			return
		}
	}
	if m.Term != nil {
		t, v, cm := m.GetTerm(), m.GetVote(), m.GetCommit()
		hs := &raftpb.HardState{Term: &t, Vote: &v, Commit: &cm}
		if err := c.storage.SetHardState(hs); err != nil {
			c.log.Error("set hard state", "err", err)
			return
		}
		c.hsMu.Lock()
		c.durableHS = hs
		c.hsMu.Unlock()
	}
	for _, r := range m.GetResponses() {
		if r.GetTo() == c.e.cfg.NodeID {
			_ = c.rn.Step(r)
		} else {
			c.send(r)
		}
	}
}

func (c *Copyset) send(m *raftpb.Message) {
	if m.GetType() == raftpb.MsgSnap {
		c.startSnapshotSend(m)
		return
	}
	c.e.transport.Send(uint64(c.id), m)
}

// logLeaderChange records, at info level, the leader changes an operator
// should see: a copyset losing the leader it had and a new leader taking
// over. The first election after start is logged at debug level only.
func (c *Copyset) logLeaderChange(lead uint64, state raft.StateType) {
	switch {
	case lead == 0:
		c.log.Info("copyset lost its leader", "leader", c.knownLead, "state", state.String())
	case c.knownLead == 0:
		c.log.Debug("copyset leader elected", "leader", lead)
		c.knownLead = lead
	default:
		c.log.Info("copyset leader elected", "previous", c.knownLead, "leader", lead, "term", c.rn.BasicStatus().GetTerm())
		c.knownLead = lead
	}
}

func (c *Copyset) handleReady(rd raft.Ready) {
	if ss := rd.SoftState; ss != nil {
		wasLeader := c.isLeader.Load()
		lead := ss.Lead
		isLeader := ss.RaftState == raft.StateLeader
		prev := c.leader.Swap(lead)
		c.isLeader.Store(isLeader)
		if prev != lead {
			c.logLeaderChange(lead, ss.RaftState)
		}
		if isLeader && !wasLeader {
			c.termStart = 0
			c.log.Debug("became leader")
		}
		if !isLeader && wasLeader {
			c.leaseUntil = time.Time{}
			c.failReadBatches(&NotLeaderError{Leader: lead})
		}
	}
	if hs := rd.HardState; hs != nil && hs.Term != nil {
		c.term.Store(hs.GetTerm())
	}
	for _, rs := range rd.ReadStates {
		c.readIndexDone(rs)
	}
	if c.isLeader.Load() && len(rd.Entries) > 0 {
		st := c.rn.BasicStatus()
		term := st.GetTerm()
		for _, en := range rd.Entries {
			if c.termStart == 0 && en.GetTerm() == term {
				c.termStart = en.GetIndex()
			}
			if en.GetType() == raftpb.EntryNormal {
				if proposer, id, ok := proposalKey(en.GetData()); ok && proposer == c.e.cfg.NodeID {
					c.assignIndex(id, en.GetIndex(), en.GetTerm())
				}
			}
		}
	}
	for _, m := range rd.Messages {
		switch m.GetTo() {
		case raft.LocalAppendThread:
			c.submitAppend(m)
		case raft.LocalApplyThread:
			c.pushApply(applyItem{m: m})
		default:
			if m.GetType() == raftpb.MsgTimeoutNow {
				// Leadership is being handed over: the target may win an
				// election at once, so the lease is void from now on.
				c.leaseUntil = time.Time{}
			}
			c.send(m)
		}
	}
}

func (c *Copyset) submitAppend(m *raftpb.Message) {
	a := wal.Append{Group: uint64(c.id), Entries: m.GetEntries()}
	if m.Term != nil {
		a.HardState = &raftpb.HardState{Term: m.Term, Vote: m.Vote, Commit: m.Commit}
	}
	if s := m.GetSnapshot(); s != nil && !raft.IsEmptySnap(s) {
		md := s.GetMetadata()
		a.Snapshot = &wal.SnapshotMark{Index: md.GetIndex(), Term: md.GetTerm(), ConfState: md.GetConfState()}
	}
	c.wal.Submit(a, func(err error) {
		c.enqueue(func(in *inbox) { in.appended = append(in.appended, appendDone{m: m, err: err}) })
	})
}

// ------------------------------------------------------------- proposals

// Proposal is a write or delete handed to the copyset. Wait returns once it
// is applied (durable on a quorum and applied on this replica) or failed.
type Proposal struct {
	id    uint64
	data  []byte
	done  chan struct{}
	index uint64 // log index, once known (Raft worker)
	term  uint64
	once  sync.Once
	res   uint64
	err   error
}

func (p *Proposal) finish(index uint64, err error) {
	p.once.Do(func() {
		p.res, p.err = index, err
		close(p.done)
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

// ProposeWrite hands a chunk write to the copyset's log. The caller checked
// the request; the copyset refuses only when it does not lead. The data is
// copied.
func (c *Copyset) ProposeWrite(chunk, volume, epoch uint64, off int64, data []byte) (*Proposal, error) {
	if int64(len(data)) > c.e.MaxWriteSize() {
		return nil, fmt.Errorf("%w: %d bytes (limit %d)", ErrTooLarge, len(data), c.e.MaxWriteSize())
	}
	return c.proposeCommand(&command{op: opWrite, chunk: chunk, volume: volume, epoch: epoch, offset: uint64(off), data: data})
}

// ProposeDelete hands a chunk delete to the copyset's log.
func (c *Copyset) ProposeDelete(chunk, volume, epoch uint64) (*Proposal, error) {
	return c.proposeCommand(&command{op: opDelete, chunk: chunk, volume: volume, epoch: epoch})
}

// Write proposes a chunk write and waits for it to be applied.
func (c *Copyset) Write(ctx context.Context, chunk, volume, epoch uint64, off int64, data []byte) (uint64, error) {
	p, err := c.ProposeWrite(chunk, volume, epoch, off, data)
	if err != nil {
		return 0, err
	}
	return c.waitProposal(ctx, p)
}

// Delete proposes a chunk delete and waits for it to be applied.
func (c *Copyset) Delete(ctx context.Context, chunk, volume, epoch uint64) (uint64, error) {
	p, err := c.ProposeDelete(chunk, volume, epoch)
	if err != nil {
		return 0, err
	}
	return c.waitProposal(ctx, p)
}

func (c *Copyset) waitProposal(ctx context.Context, p *Proposal) (uint64, error) {
	idx, err := p.Wait(ctx)
	if err != nil && ctx.Err() != nil {
		c.wmu.Lock()
		delete(c.waiters, p.id)
		c.wmu.Unlock()
	}
	return idx, err
}

func (c *Copyset) proposeCommand(cmd *command) (*Proposal, error) {
	if !c.isLeader.Load() {
		return nil, &NotLeaderError{Leader: c.leader.Load()}
	}
	cmd.proposer = c.e.cfg.NodeID
	cmd.id = c.e.newProposalID()
	p := &Proposal{id: cmd.id, data: cmd.encode(), done: make(chan struct{})}
	c.wmu.Lock()
	c.waiters[p.id] = p
	c.wmu.Unlock()
	if !c.enqueue(func(in *inbox) { in.props = append(in.props, p) }) {
		c.dropWaiter(p, ErrStopped)
		return nil, ErrStopped
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

// ------------------------------------------------------------------ apply

func (c *Copyset) pushApply(it applyItem) {
	c.amu.Lock()
	c.applyQ = append(c.applyQ, it)
	push := c.asched.signal()
	c.amu.Unlock()
	if push {
		c.e.applyQ.push(c)
	}
}

func (c *Copyset) requestCheckpoint() {
	if !c.ckptReq.Swap(true) {
		c.pushApply(applyItem{ckpt: true})
	}
}

func (c *Copyset) maybeTimedCheckpoint() {
	c.smMu.Lock()
	due := c.sm.applied > c.sm.lastCkpt && time.Since(c.sm.lastCkptTime) >= c.e.cfg.CheckpointInterval
	c.smMu.Unlock()
	if due {
		c.requestCheckpoint()
	}
}

// runApply applies queued committed entries. It runs on an apply worker.
func (c *Copyset) runApply() {
	c.amu.Lock()
	c.asched.begin()
	if c.installing.Load() {
		// A snapshot install holds the state machine; it reschedules the
		// copyset when it is done instead of keeping a worker waiting.
		c.asched.running, c.asched.again = false, false
		c.amu.Unlock()
		return
	}
	items := c.applyQ
	c.applyQ = nil
	c.amu.Unlock()

	c.smMu.Lock()
	for _, it := range items {
		switch {
		case it.snap != nil:
			c.snapshotPersisted(it.snap)
		case it.m != nil:
			if !c.applyEntries(it.m.GetEntries()) {
				// Stopped mid-way: leave the rest.
				c.smMu.Unlock()
				c.finishApplyRun()
				return
			}
			resps := it.m.GetResponses()
			c.enqueue(func(in *inbox) { in.local = append(in.local, resps...) })
		}
	}
	c.releaseReads()
	if c.ckptReq.Swap(false) || c.sm.bytesSince >= c.e.cfg.CheckpointBytes {
		if err := c.checkpointLocked(); err != nil {
			c.log.Error("checkpoint failed", "err", err)
		}
	}
	c.smMu.Unlock()
	c.finishApplyRun()
}

func (c *Copyset) finishApplyRun() {
	c.amu.Lock()
	again := c.asched.end()
	c.amu.Unlock()
	if again {
		c.e.applyQ.push(c)
	}
}

// applyEntries applies committed entries in order; it reports false if the
// engine stopped before it finished.
func (c *Copyset) applyEntries(ents []*raftpb.Entry) bool {
	for _, en := range ents {
		idx := en.GetIndex()
		switch en.GetType() {
		case raftpb.EntryConfChange, raftpb.EntryConfChangeV2:
			// Raft hands out a membership change only if it must be applied
			// to it, even when the chunk files already reflect it.
			if !c.applyConfChange(en) {
				return false
			}
		case raftpb.EntryNormal:
			if idx <= c.sm.applied || idx <= c.sm.installed {
				break
			}
			if len(en.GetData()) > 0 {
				if !c.applyCommand(en) {
					return false
				}
			}
		}
		if idx > c.sm.applied {
			c.sm.applied, c.sm.appliedTerm = idx, en.GetTerm()
			c.applied.Store(idx)
		}
		c.settleWaiters(en)
	}
	return true
}

func (c *Copyset) applyCommand(en *raftpb.Entry) bool {
	cmd, err := decodeCommand(en.GetData())
	if err != nil {
		// Every replica sees the same bytes; skipping is deterministic.
		c.log.Error("skipping undecodable entry", "index", en.GetIndex(), "err", err)
		return true
	}
	for attempt := 0; ; attempt++ {
		switch cmd.op {
		case opWrite:
			err = c.store.WriteAt(cmd.chunk, cmd.data, int64(cmd.offset))
		case opDelete:
			err = c.store.Delete(cmd.chunk)
		}
		if err == nil {
			c.sm.bytesSince += uint64(len(en.GetData()))
			return true
		}
		// A replica that cannot apply an entry must not skip it (its chunk
		// files would diverge): it stops here and retries until the cause
		// (a full pool, a disk error) goes away or the engine stops.
		c.applyErrs.Add(1)
		if attempt%50 == 0 {
			c.log.Error("cannot apply entry; retrying", "index", en.GetIndex(), "chunk", cmd.chunk, "err", err)
		}
		select {
		case <-c.e.stopped:
			return false
		case <-time.After(min(time.Duration(attempt+1)*10*time.Millisecond, time.Second)):
		}
	}
}

func (c *Copyset) applyConfChange(en *raftpb.Entry) bool {
	var cc raftpb.ConfChangeI
	if en.GetType() == raftpb.EntryConfChange {
		v := &raftpb.ConfChange{}
		if err := proto.Unmarshal(en.GetData(), v); err != nil {
			c.log.Error("undecodable membership change", "index", en.GetIndex(), "err", err)
			return true
		}
		cc = v
	} else {
		v := &raftpb.ConfChangeV2{}
		if err := proto.Unmarshal(en.GetData(), v); err != nil {
			c.log.Error("undecodable membership change", "index", en.GetIndex(), "err", err)
			return true
		}
		cc = v
	}
	var cs *raftpb.ConfState
	done := make(chan struct{})
	if !c.call(func() { cs = c.rn.ApplyConfChange(cc); close(done) }) {
		return false
	}
	select {
	case <-done:
	case <-c.e.stopped:
		return false
	}
	if en.GetIndex() > c.sm.confEpoch {
		c.sm.confState = cs
		c.sm.confEpoch = en.GetIndex()
		c.confEpoch.Store(en.GetIndex())
		c.log.Info("membership changed", "index", en.GetIndex(), "voters", cs.GetVoters(), "learners", cs.GetLearners())
	}
	// The first membership change applied on a new replica makes it part of
	// the copyset; checkpoint so the configuration survives a restart early.
	c.ckptReq.Store(true)
	return true
}

// settleWaiters finishes the proposal applied at en's index, and fails
// proposals that can no longer be applied.
func (c *Copyset) settleWaiters(en *raftpb.Entry) {
	idx := en.GetIndex()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if len(c.waiters) == 0 {
		return
	}
	if p := c.byIndex[idx]; p != nil {
		delete(c.byIndex, idx)
		proposer, id, ok := proposalKey(en.GetData())
		if en.GetType() == raftpb.EntryNormal && ok && proposer == c.e.cfg.NodeID && id == p.id {
			delete(c.waiters, p.id)
			p.finish(idx, nil)
		} else {
			delete(c.waiters, p.id)
			p.finish(0, ErrProposalLost)
		}
	} else if en.GetType() == raftpb.EntryNormal {
		// Applied without its index being known here (proposed before a
		// restart of leadership bookkeeping): match by id.
		if proposer, id, ok := proposalKey(en.GetData()); ok && proposer == c.e.cfg.NodeID {
			if p := c.waiters[id]; p != nil {
				delete(c.waiters, id)
				p.finish(idx, nil)
			}
		}
	}
	// Log terms only grow: once an entry of a newer term is applied at or
	// below a proposal's index, that proposal's entry can never commit.
	if en.GetTerm() <= c.waitTerm {
		return
	}
	c.waitTerm = en.GetTerm()
	for id, p := range c.waiters {
		if p.index != 0 && p.index >= idx && p.term < en.GetTerm() {
			delete(c.waiters, id)
			delete(c.byIndex, p.index)
			p.finish(0, ErrProposalLost)
		}
	}
}

// checkpointLocked makes the state machine durable up to the applied index
// and lets the WAL and the in-memory log drop what came before. smMu held.
func (c *Copyset) checkpointLocked() error {
	if err := c.store.Sync(); err != nil {
		return fmt.Errorf("sync chunk files: %w", err)
	}
	c.hsMu.Lock()
	hs := c.durableHS
	c.hsMu.Unlock()
	m := &meta{
		Pool: c.id.Pool(), Copyset: c.id.Copyset(),
		Applied: c.sm.applied, AppliedTerm: c.sm.appliedTerm, ConfEpoch: c.sm.confEpoch,
		Term: hs.GetTerm(), Vote: hs.GetVote(), Commit: max(hs.GetCommit(), c.sm.applied),
	}
	if c.sm.confState != nil {
		m.setConfState(c.sm.confState)
	}
	if err := writeMeta(c.dir, m); err != nil {
		return err
	}
	c.sm.lastCkpt, c.sm.lastCkptTime, c.sm.bytesSince = c.sm.applied, time.Now(), 0
	c.wal.SetCheckpoint(uint64(c.id), c.sm.applied, m.hardState())
	idx, cs, epoch := c.sm.applied, c.sm.confState, c.sm.confEpoch
	c.call(func() { c.compact(idx, cs, epoch) })
	return nil
}

// compact trims the in-memory log after a checkpoint; Raft worker only.
func (c *Copyset) compact(idx uint64, cs *raftpb.ConfState, epoch uint64) {
	if idx == 0 || cs == nil {
		return
	}
	if _, err := c.storage.CreateSnapshot(idx, cs, nil); err != nil {
		if !errors.Is(err, raft.ErrSnapOutOfDate) {
			c.log.Warn("record log snapshot", "index", idx, "err", err)
		}
		return
	}
	c.snapConfEpoch.Store(epoch)
	upTo := idx
	if upTo > c.e.cfg.RetainEntries {
		upTo -= c.e.cfg.RetainEntries
	} else {
		return
	}
	for _, s := range c.snapSending {
		// Keep what a follower receiving a snapshot will need next.
		upTo = min(upTo, s)
	}
	if c.isLeader.Load() {
		// Keep what active followers have not replicated yet, as long as
		// they are not too far behind: a follower that just installed a
		// snapshot then catches up from the log instead of needing another.
		c.rn.WithProgress(func(id uint64, _ raft.ProgressType, pr tracker.Progress) {
			if id != c.e.cfg.NodeID && pr.RecentActive && pr.Match+1 < upTo && idx-pr.Match <= c.e.cfg.MaxFollowerLag {
				upTo = max(pr.Match+1, 1)
			}
		})
	}
	if first, _ := c.storage.FirstIndex(); upTo > first {
		if err := c.storage.Compact(upTo); err != nil && !errors.Is(err, raft.ErrCompacted) {
			c.log.Warn("compact log", "index", upTo, "err", err)
		}
	}
}

func (c *Copyset) finalCheckpoint() error {
	c.smMu.Lock()
	defer c.smMu.Unlock()
	if c.sm.applied == c.sm.lastCkpt {
		return nil
	}
	return c.checkpointLocked()
}

// ------------------------------------------------------------------ reads

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

// WaitReadable returns once this replica, as leader, may serve a
// linearizable read from its chunk files: its leadership is confirmed (by
// lease or a ReadIndex round) and everything committed before the read is
// applied.
func (c *Copyset) WaitReadable(ctx context.Context) error {
	if !c.isLeader.Load() {
		return &NotLeaderError{Leader: c.leader.Load()}
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

// Read reads a linearizable range of a chunk from the leader's chunk files.
func (c *Copyset) Read(ctx context.Context, chunk uint64, off int64, p []byte) error {
	if err := c.WaitReadable(ctx); err != nil {
		return err
	}
	return c.store.ReadAt(chunk, p, off)
}

// startReads runs on the Raft worker.
func (c *Copyset) startReads(reads []*readWaiter) {
	st := c.rn.BasicStatus()
	if st.RaftState != raft.StateLeader {
		for _, r := range reads {
			r.done <- &NotLeaderError{Leader: st.Lead}
		}
		return
	}
	now := time.Now()
	if now.Before(c.leaseUntil) && st.LeadTransferee == 0 && c.termStart != 0 && st.GetCommit() >= c.termStart {
		for _, r := range reads {
			c.waitApplied(st.GetCommit(), r)
		}
		if !c.renewing && c.leaseUntil.Sub(now) < c.leaseDuration()/2 {
			c.issueReadIndex(nil, now)
		}
		return
	}
	c.issueReadIndex(reads, now)
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
	if until := b.issued.Add(c.leaseDuration()); until.After(c.leaseUntil) && c.rn.BasicStatus().LeadTransferee == 0 {
		c.leaseUntil = until
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
		if time.Since(b.issued) > limit {
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

// raftLogger routes the raft library's logs to slog.
type raftLogger struct{ l *slog.Logger }

func (r raftLogger) Debug(v ...any)                 {}
func (r raftLogger) Debugf(format string, v ...any) {}
func (r raftLogger) Info(v ...any)                  { r.l.Debug(fmt.Sprint(v...)) }
func (r raftLogger) Infof(format string, v ...any)  { r.l.Debug(fmt.Sprintf(format, v...)) }
func (r raftLogger) Warning(v ...any)               { r.l.Warn(fmt.Sprint(v...)) }
func (r raftLogger) Warningf(format string, v ...any) {
	r.l.Warn(fmt.Sprintf(format, v...))
}
func (r raftLogger) Error(v ...any)                 { r.l.Error(fmt.Sprint(v...)) }
func (r raftLogger) Errorf(format string, v ...any) { r.l.Error(fmt.Sprintf(format, v...)) }
func (r raftLogger) Fatal(v ...any)                 { r.l.Error(fmt.Sprint(v...)); os.Exit(1) }
func (r raftLogger) Fatalf(format string, v ...any) {
	r.l.Error(fmt.Sprintf(format, v...))
	os.Exit(1)
}
func (r raftLogger) Panic(v ...any)                 { panic(fmt.Sprint(v...)) }
func (r raftLogger) Panicf(format string, v ...any) { panic(fmt.Sprintf(format, v...)) }
