package copyset

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3"
	"go.etcd.io/raft/v3/raftpb"

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
	e     *Engine
	id    GroupID
	dir   string
	meta  *metaWriter // the meta file's writer; smMu held (checkpoints)
	store ChunkStore
	wal   walAppender
	log   *slog.Logger

	storage *raft.MemoryStorage
	rn      *raft.RawNode // Raft worker only

	// durableHS is the latest hard state made durable by the WAL; the
	// checkpoint records it (MemoryStorage's own copy is not safe to read
	// from another goroutine).
	hsMu      sync.Mutex
	durableHS *raftpb.HardState

	initialVoters []uint64

	mu      sync.Mutex // guards in, sched, stopped, broken
	in      inbox
	sched   schedFlags
	stopped bool
	idle    *sync.Cond    // on mu: signalled when a Raft worker run ends
	broken  error         // why the replica stopped serving, nil while healthy
	quit    chan struct{} // closed when the replica stops

	startedAt time.Time // when the replica was opened (vote refusal, see refuseVote)

	// Raft worker state.
	termStart   uint64            // index of the current leader term's first entry
	loggedHS    *raftpb.HardState // the last hard state submitted to the WAL
	knownLead   uint64            // last non-zero leader seen, for logging leader changes
	silentTicks int               // ticks since the leader was last heard (see maybeCampaign)
	// logLast is the index of the last entry of the Raft log as far as the
	// Ready states handled so far tell (Raft's own may be ahead until the
	// next one): the bound admit holds messages to. Raft worker only.
	logLast       uint64
	refusedLogged time.Time // when admit last logged a refusal
	// members are the nodes of the configuration Raft runs with (voters
	// and learners, both sides of a joint one); empty until a replica
	// knows one. Raft worker only (see checkMember).
	members map[uint64]bool
	// heard is when each peer's last message arrived, and leadSince when
	// this replica last became leader: the leader reports how long each
	// peer has been silent (Status). Raft worker only.
	heard       map[uint64]time.Time
	leadSince   time.Time
	idleTicks   int               // a leader's ticks without work (see noteQuiet)
	beatAcks    map[uint64]uint64 // quiesced leader: follower -> round of its last quiesce heartbeat answer
	beatRound   uint64            // quiesced leader: rounds of quiesce heartbeats sent
	beatLease   beatLease         // quiesced leader: its read lease, confirmed by quiesce heartbeats
	beatResp    []uint64          // peers whose heartbeat answers this round stepped (see replicatingPeers)
	replicating []uint64          // replicatingPeers' answer, reused
	confIndex   uint64            // leader: a membership change whose commit every follower is sent (see replicatingPeers)
	leaseUntil  time.Time
	// transferTerm is the term in which this leader last sent a
	// MsgTimeoutNow: no read lease holds in it (see leaseHolds).
	transferTerm uint64
	lease        atomic.Pointer[readLease] // published for reads: see WaitReadable; nil when it does not hold
	readSeq      uint64
	readBatches  map[uint64]*readBatch
	renewing     bool
	snapSending  map[uint64]uint64 // peer -> snapshot index being sent
	pending      *PendingChange    // membership change proposed here, not yet applied

	// Quiescence (quiesce.go): set while the group does not tick.
	quiesced   atomic.Bool
	quietTicks atomic.Int64 // ticks since quiesced, or since a follower's last quiesce heartbeat

	// Published state.
	leader    atomic.Uint64
	isLeader  atomic.Bool
	term      atomic.Uint64
	applied   atomic.Uint64
	confEpoch atomic.Uint64
	// conf epoch at the index of the log storage's snapshot (sent with it)
	snapConfEpoch atomic.Uint64
	installing    atomic.Bool
	installEpoch  atomic.Uint64 // conf epoch of the snapshot being installed
	// installDedup is the table of applied client requests of the
	// snapshot being installed (encoded).
	installDedup atomic.Pointer[[]byte]
	// snapDedup is the table at the log storage's snapshot (sent with it);
	// Raft worker only.
	snapDedup []byte
	applyErrs atomic.Uint64
	memLog    atomic.Int64  // bytes of entries in storage (see addLog)
	repeats   atomic.Uint64 // entries skipped as repeats of applied client requests
	pressure  atomic.Bool   // the engine is short of log memory: compact hard
	// The last checkpoint's index and time (UnixNano), for the ticker.
	ckptIndex atomic.Uint64
	ckptTime  atomic.Int64

	// Apply side.
	amu        sync.Mutex // guards applyQ, asched, applyRetry
	applyQ     []applyItem
	asched     schedFlags
	aidle      *sync.Cond  // on amu: signalled when an apply worker run ends
	applyRetry *time.Timer // a parked apply waiting to retry
	applyFails int         // consecutive failed attempts of the entry at the head; apply worker only
	smMu       sync.Mutex  // held while the state machine changes (apply, install, checkpoint)
	// filesMu is held shared by reads of the chunk files and exclusively
	// while they are rewritten from the log (see readFiles).
	filesMu   sync.RWMutex
	rewriting atomic.Pointer[chan struct{}] // set while a rewrite runs; the channel closes at its end
	sm        smState                       // guarded by smMu
	ckptReq   atomic.Bool

	// Waiters.
	wmu      sync.Mutex
	waiters  map[uint64]*Proposal // by proposal id
	byIndex  map[uint64]*Proposal // by log index, once known
	waitTerm uint64               // highest term seen by settleWaiters
	readWait []*readWaiter
}

// smState is the state machine's bookkeeping, guarded by smMu.
type smState struct {
	applied     uint64
	appliedTerm uint64
	confState   *raftpb.ConfState
	confEpoch   uint64
	lastCkpt    uint64
	bytesSince  uint64 // command bytes applied since the last checkpoint
	// installed is the index of the last snapshot whose chunk files were
	// installed completely: data entries at or below it are skipped.
	installed uint64
	// dedup records the client requests applied; ckptDedup is the table at
	// the last checkpoint (lastCkpt).
	dedup, ckptDedup *dedupTable
}

type inbox struct {
	appended []appendDone
	local    []*raftpb.Message
	msgs     []*raftpb.Message
	calls    []func()
	quiet    []func() // calls that do not wake a quiesced group (status, compaction)
	ticks    int
	props    []*Proposal
	reads    []*readWaiter
	idleBeat bool // a quiesced leader's turn to send quiesce heartbeats
	wake     bool // a quiesced follower's leader went silent
}

type appendDone struct {
	m    *raftpb.Message
	err  error
	sent bool // the responses to other replicas went out from the WAL's completion (sendsDirect)
}

type applyItem struct {
	m    *raftpb.Message  // MsgStorageApply
	snap *raftpb.Snapshot // a snapshot persisted by the append path
	ckpt bool             // checkpoint request without entries
}

// open recovers a copyset from its directory and its WAL records.
func (e *Engine) open(id GroupID, dir string, gl *wal.GroupLog) (*Copyset, error) {
	m, mw, err := loadMeta(dir)
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
		beatAcks:    make(map[uint64]uint64),
		snapSending: make(map[uint64]uint64),
		waiters:     make(map[uint64]*Proposal),
		byIndex:     make(map[uint64]*Proposal),
	}
	c.startedAt = e.now()
	c.idle = sync.NewCond(&c.mu)
	c.quit = make(chan struct{})
	c.aidle = sync.NewCond(&c.amu)
	c.initialVoters = append([]uint64(nil), m.Voters...)
	c.wal = e.wal
	c.meta = mw
	fail := func(err error) (*Copyset, error) {
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
	var hs *raftpb.HardState
	if gl != nil {
		hs = gl.HardState
	}
	hs = wal.MergeHardState(m.hardState(), hs)
	if gl != nil && gl.Snapshot != nil && gl.Snapshot.Index > base.Index {
		// A snapshot install finished (its files were synced before its
		// WAL record) but the meta file was not rewritten yet. Record it
		// there first: once the WAL learns the checkpoint below, it may
		// recycle the segment holding the snapshot record.
		base = gl.Snapshot
		confEpoch = max(confEpoch, base.ConfEpoch)
		m.Applied, m.AppliedTerm, m.ConfEpoch = base.Index, base.Term, confEpoch
		m.setConfState(base.ConfState)
		m.Commit = max(m.Commit, base.Index)
		m.Requests = base.Requests
		if err := mw.write(m); err != nil {
			return fail(fmt.Errorf("record installed snapshot %d: %w", base.Index, err))
		}
	}
	if err := checkInstall(dir, base.Index); err != nil {
		return fail(err)
	}
	dedup, err := decodeDedupTable(m.Requests)
	if err != nil {
		return fail(fmt.Errorf("%w: %s: %v", ErrMetaCorrupt, dir, err))
	}
	c.snapDedup = m.Requests
	var ents []*raftpb.Entry
	if gl != nil {
		for _, en := range gl.Entries {
			if en.GetIndex() > base.Index {
				ents = append(ents, en)
			}
		}
		// The entries must continue the base without a gap and must not be
		// older than it. Anything else means entries this replica made
		// durable (and may have acknowledged) are gone: refuse to start it
		// rather than serve a log with a hole.
		if len(ents) > 0 && (ents[0].GetIndex() != base.Index+1 || ents[0].GetTerm() < base.Term) {
			return fail(fmt.Errorf("%w: log entries from %d (term %d) do not follow the checkpoint at %d (term %d)",
				ErrLogDamaged, ents[0].GetIndex(), ents[0].GetTerm(), base.Index, base.Term))
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
		var n int64
		for _, en := range ents {
			n += int64(entryBytes(en))
		}
		c.addLog(n)
	}
	last, _ := c.storage.LastIndex()
	c.logLast = last
	commit := min(max(hs.GetCommit(), base.Index), last)
	hs.Commit = &commit
	if err := c.storage.SetHardState(hs); err != nil {
		return fail(fmt.Errorf("restore hard state: %w", err))
	}
	c.durableHS = hs
	c.sm = smState{
		applied: base.Index, appliedTerm: base.Term, confState: base.ConfState, confEpoch: confEpoch,
		lastCkpt: base.Index,
		dedup:    dedup, ckptDedup: dedup.clone(),
	}
	c.setMembers(base.ConfState)
	c.snapConfEpoch.Store(confEpoch)
	c.applied.Store(base.Index)
	c.ckptIndex.Store(base.Index)
	c.ckptTime.Store(e.now().UnixNano())
	c.confEpoch.Store(confEpoch)
	rn, err := raft.NewRawNode(&raft.Config{
		ID:                       e.cfg.NodeID,
		ElectionTick:             e.cfg.ElectionTicks,
		HeartbeatTick:            e.cfg.HeartbeatTicks,
		Storage:                  c.storage,
		Applied:                  base.Index,
		AsyncStorageWrites:       true,
		MaxSizePerMsg:            1 << 20,
		MaxCommittedSizePerReady: 8 << 20,
		// Proposals wait for the engine's budget before they reach Raft,
		// so this cap is never what drops one.
		MaxUncommittedEntriesSize: 2 * uint64(e.cfg.MaxInflightBytes),
		MaxInflightMsgs:           256,
		MaxInflightBytes:          e.cfg.MaxAppendBytes,
		CheckQuorum:               true,
		PreVote:                   true,
		// A leader removed from its copyset steps down instead of leading
		// a group it is no longer part of.
		StepDownOnRemoval:         true,
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

// brokenReplica stands for a replica whose durable state could not be
// recovered (err): it holds no Raft node and serves nothing, and reports
// err so that the copyset's peers rebuild it (see Copyset.Broken).
func (e *Engine) brokenReplica(id GroupID, dir string, err error) *Copyset {
	c := &Copyset{
		e: e, id: id, dir: dir, log: e.log.With("copyset", id.String()),
		storage: raft.NewMemoryStorage(), stopped: true, broken: err, quit: make(chan struct{}),
		waiters: make(map[uint64]*Proposal), byIndex: make(map[uint64]*Proposal),
	}
	close(c.quit)
	c.idle = sync.NewCond(&c.mu)
	c.aidle = sync.NewCond(&c.amu)
	c.wal = e.wal
	if m, merr := readMeta(dir); merr == nil {
		c.initialVoters = append([]uint64(nil), m.Voters...)
		c.sm = smState{applied: m.Applied, appliedTerm: m.AppliedTerm, confState: m.confState(), confEpoch: m.ConfEpoch}
		c.applied.Store(m.Applied)
		c.confEpoch.Store(m.ConfEpoch)
		c.term.Store(m.Term)
	}
	c.log.Error("copyset replica broken: it serves nothing until it is rebuilt from its peers", "err", err)
	return c
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
