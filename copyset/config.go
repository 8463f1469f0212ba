package copyset

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"runtime"
	"time"

	"google.golang.org/grpc"

	"cairn.io/cairn/copyset/transport"
	"cairn.io/cairn/copyset/wal"
	"cairn.io/cairn/internal/geometry"
)

// ChunkStore is a copyset's state machine: its chunk files. The chunkserver's
// datastore implements it. Writes need not be durable until Sync.
type ChunkStore interface {
	// WriteAt writes p at off of a chunk, creating the chunk if needed.
	WriteAt(chunkID uint64, p []byte, off int64) error
	// WriteAtSN is WriteAt for a write of a volume at sequence number sn
	// whose newest live snapshot is keep: it first keeps what the
	// volume's snapshots need of the data it overwrites (copy on write).
	// sn 0 is WriteAt.
	WriteAtSN(chunkID uint64, p []byte, off int64, sn, keep uint64) error
	// ReadAt reads len(p) bytes at off of an existing chunk.
	ReadAt(chunkID uint64, p []byte, off int64) error
	// ReadAtSN reads a chunk as it was at the end of sequence number
	// snap (a snapshot of its volume); ReadOwnedSN also says which pages
	// read from a clone's source then (as ReadOwned).
	ReadAtSN(chunkID uint64, p []byte, off int64, snap uint64) error
	ReadOwnedSN(chunkID uint64, p []byte, off int64, snap uint64) (absent []byte, err error)
	// Trim drops what the volume's live snapshots below bound no longer
	// read of a chunk's kept versions.
	Trim(chunkID uint64, live []uint64, bound uint64) error

	// What a Raft snapshot moves of a chunk beside its data: the sequence
	// number it was created under and its kept versions (the datastore's
	// transfer.go tells the protocol).
	CreatedSN(chunkID uint64) (uint64, error)
	EachKept(chunkID uint64, f func(from, to uint64, unit int64, bitmap, absent []byte)) error
	ReadKept(chunkID, from uint64, p []byte, off int64) error
	ResetChunk(chunkID, createdSN uint64, owned []byte) (fresh bool, err error)
	BeginKept(chunkID, from, to uint64, absent []byte) error
	WriteKept(chunkID, from uint64, p []byte, off int64) error
	SealKept(chunkID, from uint64, bitmap []byte) error
	// Clones (the datastore's clone.go): WriteClone writes into a clone's
	// chunk (created as one), taking the fill's whole pages of the
	// clone's source where it does not own them first; ReadOwned reads
	// and marks the pages not owned; ZeroSN zeroes a clone's chunk and
	// owns every page; Owned is what a Raft snapshot moves of a clone's
	// chunk before its data (nil for other chunks).
	WriteClone(chunkID uint64, p []byte, off int64, sn, keep uint64, fill []byte, fillOff int64) error
	ReadOwned(chunkID uint64, p []byte, off int64) (absent []byte, err error)
	ZeroSN(chunkID, sn, keep uint64) error
	Owned(chunkID uint64) ([]byte, error)
	SetOwned(chunkID uint64, bits []byte) error
	// Delete removes a chunk; deleting a missing chunk succeeds.
	Delete(chunkID uint64) error
	// DeleteSN is Delete for a client's delete under sequence number sn:
	// a chunk a live snapshot (keep) may read is zeroed through copy on
	// write instead.
	DeleteSN(chunkID, sn, keep uint64) error
	// List returns the ids of the chunks held, sorted.
	List() []uint64
	// Sync makes every write completed so far durable. failed, if not
	// nil, is called once as soon as data may be lost (a chunk's fdatasync
	// failed), before the store does anything else about it: reads of the
	// chunks may go back in time from then on. No read of a chunk overlaps
	// its fdatasync, and failed is called while the failed chunk is still
	// held from reads; it must not block.
	Sync(failed func()) error
	// Destroy removes every chunk and the store's directory.
	Destroy() error
	Close() error
}

// Config configures an Engine.
type Config struct {
	// NodeID is the chunkserver's id, also its Raft node id. Required.
	NodeID uint64
	// Dir is the engine's directory: it holds wal/, copysets/ and trash/.
	Dir string
	// Segments supplies WAL segment files (the chunk file pool). Required.
	Segments wal.SegmentSource
	// OpenStore opens (creating if needed) the chunk store in a copyset's
	// chunk directory. Required.
	OpenStore func(dir string) (ChunkStore, error)
	// ChunkSize is the data size of a chunk, used to stream snapshots.
	ChunkSize int64
	// CopyUnit is the page size of a clone chunk's owned pages
	// (geometry.CopyUnit of the cluster's constants), used to check the
	// shape of clone writes.
	CopyUnit int64
	// Resolver maps peer chunkserver ids to addresses. Required.
	Resolver transport.Resolver
	// Dialer opens the connections Raft messages travel on (default TCP);
	// DialOptions are added to those of snapshot transfers (gRPC). The
	// chunkserver sets both for TLS.
	Dialer      func(ctx context.Context, addr string) (net.Conn, error)
	DialOptions []grpc.DialOption
	// Members, if set, is asked about a Raft message from a node this
	// replica does not count among its copyset's members (its own view
	// may be stale): MemberYes takes it, MemberNo and MemberPending refuse
	// it (Raft resends). It runs on a Raft worker and must not block. Nil:
	// messages from any node are taken.
	Members func(group GroupID, node uint64) MemberAnswer
	// AuthorizeSender, if set, decides whether the caller of a received
	// Raft batch or snapshot may speak for the chunkserver it names
	// (transport.Config.AuthorizeSender).
	AuthorizeSender func(ctx context.Context, from uint64) error

	// RaftWorkers and ApplyWorkers size the two worker pools (default
	// 2*GOMAXPROCS each, at least 4).
	RaftWorkers, ApplyWorkers int
	// TickInterval is the Raft tick (default 100ms). ElectionTicks (default
	// 10) and HeartbeatTicks (default 1) are in ticks.
	TickInterval                  time.Duration
	ElectionTicks, HeartbeatTicks int
	// QuiesceTicks is how long, in ticks, a leader must see nothing but
	// heartbeats before its group stops ticking (default 20; negative:
	// never). IdleBeatTicks is how often a quiesced leader tells its
	// followers it is alive (default ElectionTicks/2). See quiesce.go.
	QuiesceTicks, IdleBeatTicks int
	// A copyset checkpoints after CheckpointBytes of applied commands
	// (default 4 MiB) or CheckpointInterval (default 30s).
	CheckpointBytes    uint64
	CheckpointInterval time.Duration

	// Memory. Every byte a chunkserver holds for Raft is bounded:
	//
	// MaxInflightBytes bounds the proposals this chunkserver leads that are
	// not yet applied or failed (default 64 MiB); a proposal waits for room
	// (back-pressure) rather than fail. Raft's own caps per copyset
	// (uncommitted entries, appends in flight to each follower) follow from
	// it and from MaxAppendBytes.
	MaxInflightBytes int64
	// MaxAppendBytes bounds the bytes of appends a leader has in flight to
	// one follower of one copyset (default 4 MiB).
	MaxAppendBytes uint64
	// After a checkpoint a copyset keeps RetainBytes of applied entries
	// (default 512 KiB) for followers slightly behind, and what an active
	// follower still needs while it is at most MaxFollowerLagBytes behind
	// (default 8 MiB); a follower further behind is brought back by a
	// snapshot.
	RetainBytes         uint64
	MaxFollowerLagBytes uint64
	// MaxLogBytes bounds the entries all copysets hold in memory together
	// (default 128 MiB): beyond it the copysets holding the most checkpoint
	// and keep only what Raft cannot do without.
	MaxLogBytes int64
	// QueueBytes bounds the Raft messages queued for one peer lane in the
	// transport (default 16 MiB); beyond it messages are dropped and Raft
	// resends them.
	QueueBytes int

	// MaxWALSegments: beyond it, the copysets pinning the oldest segment
	// are asked to checkpoint (default 16).
	MaxWALSegments int
	// SnapshotBytesPerSec throttles outgoing snapshot data per chunkserver
	// (0: unlimited).
	SnapshotBytesPerSec int64
	// OnWALSync is called after every WAL group commit (metrics).
	OnWALSync func(wal.SyncInfo)
	// OnProposalApplied is called as each proposal of this chunkserver's
	// (a write, a delete) is applied, with how long its stages took
	// (metrics).
	OnProposalApplied func(ProposalTimes)
	// OnStorageFailure is called once when the shared WAL fails (a write or
	// fdatasync error): every copyset of the engine has stopped, and the
	// chunkserver should restart (recovery replays the durable log) or be
	// taken out of service. Default: only logged.
	OnStorageFailure func(error)
	Logger           *slog.Logger
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// TestingKnobs let tests drive what is otherwise real time or invisible.
type TestingKnobs struct {
	// Now replaces time.Now for the clocks of read leases and of the vote
	// refusal after start.
	Now func() time.Time
	// ManualTicks stops the engine's ticker from ticking the copysets:
	// the test ticks them (tickAll) so that Raft's timers move only when
	// it says.
	ManualTicks bool
	// QuiesceManualTicks keeps quiescence on under ManualTicks (which
	// otherwise turns it off), for tests of how quiesced replicas wake.
	QuiesceManualTicks bool
	// Faults injects network faults into the Raft transport.
	Faults *transport.Faults
	// Network, if set, carries the engine's Raft traffic in memory
	// instead of over sockets (Register then serves nothing).
	Network *transport.Network
	// OnRewrite is called after each entry a replica rewrites into its
	// chunk files from its log after their sync failed.
	OnRewrite func(id GroupID, index uint64)
}

// validate checks the required fields and fills in defaults.
func (cfg *Config) validate() error {
	if cfg.NodeID == 0 || cfg.Segments == nil || cfg.OpenStore == nil || cfg.Resolver == nil {
		return errors.New("copyset: engine needs NodeID, Segments, OpenStore and Resolver")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.TestingKnobs.Now == nil {
		cfg.TestingKnobs.Now = time.Now
	}
	n := max(2*runtime.GOMAXPROCS(0), 4)
	if cfg.RaftWorkers <= 0 {
		cfg.RaftWorkers = n
	}
	if cfg.ApplyWorkers <= 0 {
		cfg.ApplyWorkers = n
	}
	if cfg.TickInterval <= 0 {
		cfg.TickInterval = 100 * time.Millisecond
	}
	if cfg.ElectionTicks <= 0 {
		cfg.ElectionTicks = 10
	}
	if cfg.HeartbeatTicks <= 0 {
		cfg.HeartbeatTicks = 1
	}
	if cfg.QuiesceTicks == 0 {
		cfg.QuiesceTicks = 2 * cfg.ElectionTicks
	}
	if cfg.IdleBeatTicks <= 0 {
		cfg.IdleBeatTicks = max(cfg.ElectionTicks/2, 1)
	}
	if cfg.CheckpointBytes == 0 {
		cfg.CheckpointBytes = 4 << 20
	}
	if cfg.CheckpointInterval <= 0 {
		cfg.CheckpointInterval = 30 * time.Second
	}
	if cfg.MaxInflightBytes <= 0 {
		cfg.MaxInflightBytes = 64 << 20
	}
	if cfg.MaxAppendBytes == 0 {
		cfg.MaxAppendBytes = 4 << 20
	}
	if cfg.RetainBytes == 0 {
		cfg.RetainBytes = 512 << 10
	}
	if cfg.MaxFollowerLagBytes == 0 {
		cfg.MaxFollowerLagBytes = 8 << 20
	}
	if cfg.MaxLogBytes <= 0 {
		cfg.MaxLogBytes = 128 << 20
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = 16 << 20
	}
	if cfg.MaxWALSegments <= 0 {
		cfg.MaxWALSegments = 16
	}
	if cfg.ChunkSize <= 0 {
		cfg.ChunkSize = geometry.DefaultChunkSize
	}
	return nil
}
