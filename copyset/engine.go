package copyset

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/chunkfilepool/fsutil"
	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/copyset/wal"
	"cairn.io/cairn/internal/wire"
)

// walAppender is what a copyset needs of a write-ahead log.
type walAppender interface {
	Submit(a wal.Append, done func(error))
	// TryCommit writes an append on the caller when the WAL is idle
	// (wal.WAL.TryCommit).
	TryCommit(a wal.Append) (wrote bool, err error)
	SetCheckpoint(group, index uint64, hs *raftpb.HardState)
	Forget(groups ...uint64) error
}

// Engine runs every copyset of one chunkserver.
type Engine struct {
	cfg Config
	log *slog.Logger

	// refused counts the Raft messages from the network that failed their
	// checks (see admit).
	refused atomic.Uint64
	// leaderChanges counts the leader changes replicas here saw after their
	// first leader (elections and transfers).
	leaderChanges atomic.Uint64
	// snapshots counts snapshot transfers (see SnapshotStats).
	snapshots struct{ sent, sendFailed, installed atomic.Uint64 }

	wal       *wal.WAL // the shared write-ahead log
	transport raftTransport

	mu     sync.RWMutex
	groups map[GroupID]*Copyset
	// replaceMu serializes Create and Remove. Remove takes a copyset out of
	// groups before it moves the copyset's directory to the trash: a Create
	// of the same copyset in between would open that directory, adopting
	// the old replica's chunk files, and lose it to the trash right after.
	replaceMu sync.Mutex

	raftQ, applyQ *workQueue
	limiter       *rateLimiter
	snapSem       chan struct{}
	budget        *semaphore.Weighted // proposal bytes in flight (MaxInflightBytes)
	inflight      atomic.Int64        // bytes of the budget taken
	logBytes      atomic.Int64        // entry bytes held by every copyset's in-memory log

	idBase  uint64
	nextID  atomic.Uint64
	stopped chan struct{}
	closed  atomic.Bool
	wg      sync.WaitGroup

	// failed is set once the shared storage failed (see failStorage).
	failed   atomic.Bool
	failOnce sync.Once
}

// NewEngine opens the engine's directory, recovers the WAL and every copyset
// found on disk, and starts the workers.
func NewEngine(cfg Config) (*Engine, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	e := &Engine{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "copyset-engine", "node", cfg.NodeID),
		groups:  make(map[GroupID]*Copyset),
		raftQ:   newWorkQueue(),
		applyQ:  newWorkQueue(),
		limiter: newRateLimiter(cfg.SnapshotBytesPerSec),
		snapSem: make(chan struct{}, 4),
		budget:  semaphore.NewWeighted(cfg.MaxInflightBytes),
		idBase:  uint64(time.Now().UnixNano()),
		stopped: make(chan struct{}),
	}
	for _, d := range []string{"copysets", "trash"} {
		if err := os.MkdirAll(filepath.Join(cfg.Dir, d), 0o755); err != nil {
			return nil, fmt.Errorf("copyset: create %s: %w", d, err)
		}
	}
	logs, damaged, err := e.openWAL()
	if err != nil {
		return nil, err
	}
	tcfg := transport.Config{
		NodeID:          cfg.NodeID,
		Resolver:        cfg.Resolver,
		Dialer:          cfg.Dialer,
		DialOptions:     cfg.DialOptions,
		AuthorizeSender: cfg.AuthorizeSender,
		Handler:         e,
		Faults:          cfg.TestingKnobs.Faults,
		QueueBytes:      cfg.QueueBytes,
		Logger:          cfg.Logger,
		OnUnreachable: func(to uint64, groups []uint64) {
			for _, g := range groups {
				if c := e.get(GroupID(g)); c != nil {
					c.call(func() { c.rn.ReportUnreachable(to) })
				}
			}
		},
	}
	if nw := cfg.TestingKnobs.Network; nw != nil {
		e.transport = nw.Join(tcfg)
	} else {
		e.transport = transport.New(tcfg)
	}
	if err := e.loadAll(logs, damaged); err != nil {
		e.shutdownWorkers()
		e.wal.Close()
		return nil, err
	}
	for i := 0; i < cfg.RaftWorkers; i++ {
		e.wg.Add(1)
		go e.raftWorker()
	}
	for i := 0; i < cfg.ApplyWorkers; i++ {
		e.wg.Add(1)
		go e.applyWorker()
	}
	e.wg.Add(1)
	go e.ticker()
	return e, nil
}

// loadAll opens every copyset directory and forgets WAL records of groups
// that no longer exist here. With damaged set, every copyset loads broken.
func (e *Engine) loadAll(logs map[uint64]*wal.GroupLog, damaged error) error {
	des, err := os.ReadDir(filepath.Join(e.cfg.Dir, "copysets"))
	if err != nil {
		return fmt.Errorf("copyset: list copysets: %w", err)
	}
	for _, de := range des {
		id, ok := parseGroupID(de.Name())
		if !ok || !de.IsDir() {
			continue
		}
		dir := filepath.Join(e.cfg.Dir, "copysets", de.Name())
		if _, err := os.Stat(filepath.Join(dir, metaFile)); errors.Is(err, os.ErrNotExist) {
			// Creation never finished: nothing was ever acknowledged here.
			e.log.Warn("removing half-created copyset", "copyset", id)
			if err := os.RemoveAll(dir); err != nil {
				return fmt.Errorf("copyset: remove half-created %s: %w", id, err)
			}
			continue
		}
		var gl *wal.GroupLog
		if logs != nil {
			gl = logs[uint64(id)]
			delete(logs, uint64(id))
		}
		if damaged != nil {
			e.groups[id] = e.brokenReplica(id, dir, damaged)
			continue
		}
		c, err := e.open(id, dir, gl)
		if errors.Is(err, ErrLogDamaged) || errors.Is(err, ErrMetaCorrupt) || errors.Is(err, ErrInstallInterrupted) {
			// This replica cannot be trusted; its peers can. It is kept,
			// broken, so that it is reported and rebuilt from them.
			c = e.brokenReplica(id, dir, fmt.Errorf("recover: %w", err))
		} else if err != nil {
			return fmt.Errorf("copyset: load %s: %w", id, err)
		}
		e.groups[id] = c
	}
	var orphans []uint64
	for g := range logs {
		orphans = append(orphans, g)
	}
	if len(orphans) > 0 {
		// Records of copysets removed before a crash: make them obsolete
		// durably, so that a copyset created again with one of these ids
		// never recovers them.
		if err := e.wal.Forget(orphans...); err != nil {
			return fmt.Errorf("copyset: forget removed copysets: %w", err)
		}
	}
	e.log.Info("copysets loaded", "count", len(e.groups))
	return nil
}

// Register installs the Raft transport's receiving side on the
// chunkserver's servers: Raft batches on w, snapshot transfers on g.
func (e *Engine) Register(g *grpc.Server, w *wire.Server) { e.transport.Register(g, w) }

// NodeID is the chunkserver's Raft node id.
func (e *Engine) NodeID() uint64 { return e.cfg.NodeID }

// MaxWriteSize is the largest write a copyset accepts: a quarter of a WAL
// segment, so that a log record always fits a segment with room to spare.
func (e *Engine) MaxWriteSize() int64 {
	return e.cfg.Segments.FileSize()/4 - 4096
}

// Create creates a copyset with the given voting members (which must include
// this node), or, with no peers, an empty replica that waits to be added by
// the copyset's leader and filled by a snapshot. Creating a copyset that
// exists with the same members succeeds.
func (e *Engine) Create(id GroupID, peers []uint64) error {
	if e.closed.Load() {
		return ErrStopped
	}
	peers = append([]uint64(nil), peers...)
	sort.Slice(peers, func(i, j int) bool { return peers[i] < peers[j] })
	if len(peers) > 0 {
		self := false
		for i, p := range peers {
			if p == 0 || (i > 0 && peers[i-1] == p) {
				return fmt.Errorf("copyset: invalid member list %v", peers)
			}
			self = self || p == e.cfg.NodeID
		}
		if !self {
			return fmt.Errorf("copyset: member list %v does not include this chunkserver (%d)", peers, e.cfg.NodeID)
		}
	}
	e.replaceMu.Lock()
	defer e.replaceMu.Unlock()
	if c := e.get(id); c != nil && len(peers) == 0 && c.Broken() != nil {
		// A replica being rebuilt from its peers: the broken one goes to
		// the trash and an empty one takes its place.
		e.log.Info("replacing a broken replica with an empty one to be rebuilt from its peers", "copyset", id, "broken", c.Broken())
		if err := e.remove(id); err != nil {
			return fmt.Errorf("copyset: replace broken %s: %w", id, err)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if c := e.groups[id]; c != nil {
		if len(peers) == 0 || equalIDs(c.initialVoters, peers) {
			return nil
		}
		return fmt.Errorf("%w: %s with members %v", ErrExists, id, c.initialVoters)
	}
	dir := filepath.Join(e.cfg.Dir, "copysets", id.DirName())
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("copyset: create %s: %w", id, err)
	}
	m := &meta{Pool: id.Pool(), Copyset: id.Copyset()}
	if len(peers) > 0 {
		// Every member starts from the same snapshot at index 1 holding the
		// initial configuration, so no bootstrap entries are needed.
		m.Applied, m.AppliedTerm, m.Term, m.Commit = 1, 1, 1, 1
		m.Voters = peers
	}
	if err := (&metaWriter{dir: dir}).write(m); err != nil {
		os.RemoveAll(dir)
		return fmt.Errorf("copyset: create %s: %w", id, err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dir)); err != nil {
		return err
	}
	c, err := e.open(id, dir, nil)
	if err != nil {
		return fmt.Errorf("copyset: open new %s: %w", id, err)
	}
	e.groups[id] = c
	e.log.Debug("copyset created", "copyset", id, "peers", peers) // the caller logs batches
	return nil
}

func equalIDs(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Get returns a hosted copyset.
func (e *Engine) Get(id GroupID) (*Copyset, error) {
	if c := e.get(id); c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
}

func (e *Engine) get(id GroupID) *Copyset {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.groups[id]
}

// List returns every hosted copyset, ordered by id.
func (e *Engine) List() []*Copyset {
	e.mu.RLock()
	out := make([]*Copyset, 0, len(e.groups))
	for _, c := range e.groups {
		out = append(out, c)
	}
	e.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// Remove stops a copyset and moves its directory to the trash. Its chunk
// files stay there until PurgeTrash returns them to the pool.
func (e *Engine) Remove(id GroupID) error {
	e.replaceMu.Lock()
	defer e.replaceMu.Unlock()
	return e.remove(id)
}

// ErrReplaced is returned by RemoveReplica when the copyset's replica is no
// longer the one named: a new one took its place.
var ErrReplaced = errors.New("copyset: the replica was replaced")

// RemoveReplica is Remove of one replica: it does nothing, and returns
// ErrReplaced, when the copyset now has another replica here (a broken one
// was replaced by an empty one since the caller looked).
func (e *Engine) RemoveReplica(c *Copyset) error {
	e.replaceMu.Lock()
	defer e.replaceMu.Unlock()
	if now := e.get(c.id); now != c {
		return fmt.Errorf("%w: %s", ErrReplaced, c.id)
	}
	return e.remove(c.id)
}

// remove is Remove, called with e.replaceMu held: no Create of the copyset
// runs until its directory is in the trash.
func (e *Engine) remove(id GroupID) error {
	e.mu.Lock()
	c := e.groups[id]
	delete(e.groups, id)
	e.mu.Unlock()
	if c == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	c.stop()
	e.logBytes.Add(-c.memLog.Load())
	if c.store != nil {
		if err := c.store.Close(); err != nil {
			e.log.Warn("closing removed copyset's store", "copyset", id, "err", err)
		}
	}
	if err := c.wal.Forget(uint64(id)); err != nil {
		return fmt.Errorf("copyset: forget %s in the write-ahead log: %w", id, err)
	}
	dst := filepath.Join(e.cfg.Dir, "trash", fmt.Sprintf("%s.%d", id.DirName(), time.Now().UnixNano()))
	if err := os.Rename(c.dir, dst); err != nil {
		return fmt.Errorf("copyset: move %s to trash: %w", id, err)
	}
	if err := fsutil.SyncDir(filepath.Join(e.cfg.Dir, "copysets")); err != nil {
		return err
	}
	e.log.Info("copyset removed to trash", "copyset", id, "trash", dst)
	return nil
}

// PurgeTrash destroys trashed copysets older than age, returning their chunk
// files to the pool. It reports how many it purged.
func (e *Engine) PurgeTrash(age time.Duration) (int, error) {
	dir := filepath.Join(e.cfg.Dir, "trash")
	des, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("copyset: list trash: %w", err)
	}
	n := 0
	for _, de := range des {
		name, stamp, ok := strings.Cut(de.Name(), ".")
		if _, idok := parseGroupID(name); !ok || !idok {
			continue
		}
		ns, err := strconv.ParseInt(stamp, 10, 64)
		if err != nil || time.Since(time.Unix(0, ns)) < age {
			continue
		}
		p := filepath.Join(dir, de.Name())
		s, err := e.cfg.OpenStore(filepath.Join(p, "chunks"))
		if err != nil {
			return n, fmt.Errorf("copyset: open trashed %s: %w", de.Name(), err)
		}
		if err := s.Destroy(); err != nil {
			return n, fmt.Errorf("copyset: destroy trashed %s: %w", de.Name(), err)
		}
		if err := os.RemoveAll(p); err != nil {
			return n, fmt.Errorf("copyset: remove trashed %s: %w", de.Name(), err)
		}
		n++
	}
	return n, nil
}

// Close checkpoints every copyset, stops the workers and closes the WAL.
func (e *Engine) Close() error {
	if !e.closed.CompareAndSwap(false, true) {
		return nil
	}
	e.transport.Close()
	for _, c := range e.List() {
		c.stop()
	}
	e.shutdownWorkers()
	var firstErr error
	for _, c := range e.List() {
		if c.Broken() != nil {
			if c.store != nil {
				c.store.Close()
			}
			continue
		}
		if err := c.finalCheckpoint(); err != nil && firstErr == nil {
			firstErr = err
		}
		if err := c.store.Close(); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	if err := e.wal.Close(); err != nil && firstErr == nil {
		firstErr = err
	}
	return firstErr
}

// openWAL opens the engine's shared write-ahead log and returns what it
// recovered per copyset. A log that cannot be trusted is set aside and a
// new one opened; damaged then says why, and every copyset is loaded
// broken, to be rebuilt from its peers.
func (e *Engine) openWAL() (logs map[uint64]*wal.GroupLog, damaged error, err error) {
	open := func() (*wal.WAL, map[uint64]*wal.GroupLog, error) {
		return wal.Open(wal.Options{
			Dir: filepath.Join(e.cfg.Dir, "wal"), Source: e.cfg.Segments, OnSync: e.cfg.OnWALSync, Logger: e.cfg.Logger,
			OnPressure: e.walPressure,
		})
	}
	w, logs, err := open()
	if errors.Is(err, wal.ErrCorrupt) {
		// Entries this chunkserver made durable, of copysets unknown,
		// are gone. Its replicas cannot be trusted, their peers can:
		// every one is loaded broken and rebuilt from its peers, on a
		// new, empty log. The damaged log is kept aside for diagnosis.
		aside := filepath.Join(e.cfg.Dir, fmt.Sprintf("wal.damaged-%d", time.Now().UnixNano()))
		e.log.Error("write-ahead log damaged; every copyset of this chunkserver will be rebuilt from its peers",
			"err", err, "kept_at", aside)
		if rerr := os.Rename(filepath.Join(e.cfg.Dir, "wal"), aside); rerr != nil {
			return nil, nil, fmt.Errorf("copyset: set aside damaged wal: %w (after %w)", rerr, err)
		}
		damaged = fmt.Errorf("write-ahead log damaged (kept at %s): %w", aside, err)
		w, logs, err = open()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("copyset: open wal: %w", err)
	}
	e.wal = w
	return logs, damaged, nil
}

func (e *Engine) shutdownWorkers() {
	select {
	case <-e.stopped:
	default:
		close(e.stopped)
	}
	e.raftQ.close()
	e.applyQ.close()
	e.wg.Wait()
}

// raftTransport is what the engine needs of its Raft transport: the
// network one (transport.Transport) or, in tests, an in-memory one
// (transport.Memory).
type raftTransport interface {
	// Send queues m of copyset group for its destination; false when it
	// was dropped.
	Send(group uint64, m *raftpb.Message) bool
	// SendNow is Send that may send on the caller (transport.SendNow).
	SendNow(group uint64, m *raftpb.Message) bool
	OpenSnapshot(ctx context.Context, to uint64) (*transport.SnapshotStream, error)
	Register(g *grpc.Server, w *wire.Server)
	Stats() transport.Stats
	Close()
}

// HandleRaft implements transport.Handler.
func (e *Engine) HandleRaft(from, group uint64, m *raftpb.Message) {
	if c := e.get(GroupID(group)); c != nil {
		c.deliver(m)
	}
}

// HandleSnapshot implements transport.Handler.
func (e *Engine) HandleSnapshot(ctx context.Context, header *transportpb.SnapshotChunk, next func() (*transportpb.SnapshotChunk, error)) error {
	c := e.get(GroupID(header.GetGroup()))
	if c == nil {
		return fmt.Errorf("%w: %s", ErrNotFound, GroupID(header.GetGroup()))
	}
	return c.installSnapshot(ctx, header, next)
}

func (e *Engine) newProposalID() uint64 { return e.idBase + e.nextID.Add(1) }

// reserve waits until n more bytes of proposals fit the engine's budget
// (MaxInflightBytes) and returns the function that gives them back. A
// proposal larger than the whole budget waits for it to be empty.
func (e *Engine) reserve(ctx context.Context, n int64) (release func(), err error) {
	n = min(n, e.cfg.MaxInflightBytes)
	if err := e.budget.Acquire(ctx, n); err != nil {
		return nil, err
	}
	e.inflight.Add(n)
	var once sync.Once
	return func() {
		once.Do(func() {
			e.inflight.Add(-n)
			e.budget.Release(n)
		})
	}, nil
}

// now is the engine's clock (TestingKnobs.Now in tests).
func (e *Engine) now() time.Time { return e.cfg.TestingKnobs.Now() }

// electionTimeout is the shortest time a follower waits after hearing from
// its leader before it votes for another candidate.
func (e *Engine) electionTimeout() time.Duration {
	return time.Duration(e.cfg.ElectionTicks) * e.cfg.TickInterval
}

// failStorage stops every copyset after the shared WAL failed: what it holds
// on disk is what recovery will find, and no replica of this chunkserver may
// acknowledge, vote or serve any more. Leaders among them stop sending
// heartbeats, so their peers elect new leaders within an election timeout.
func (e *Engine) failStorage(err error) {
	e.failOnce.Do(func() {
		e.failed.Store(true)
		e.log.Error("chunkserver storage failed; every copyset stops", "err", err)
		for _, c := range e.List() {
			c.fail(err)
		}
		if f := e.cfg.OnStorageFailure; f != nil {
			f(err)
		}
	})
}
