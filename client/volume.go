package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/geometry"
	"cairn.io/cairn/mds/mdsclient"
)

// Options tune a volume handle. Zero values take the defaults named.
type Options struct {
	// ReadOnly opens the volume without taking the write epoch: it fences
	// no one and cannot write.
	ReadOnly bool
	// Snapshot opens the volume's snapshot of that name instead (read
	// only): reads return the volume as it was when the snapshot was
	// taken.
	Snapshot string
	// ClientName is recorded in the MDS session (who has the volume open);
	// default "<host>/pid-<pid>".
	ClientName string
	// Node is the node a CSI node plugin opens the volume on: the MDS
	// admits the open only if the volume is published to that node
	// (writable, for a writable open). Empty outside CSI.
	Node string
	// RetryTimeout bounds how long one IO keeps retrying transient failures
	// before it fails with ErrTimeout (default 60s).
	RetryTimeout time.Duration
	// AttemptTimeout bounds one attempt of a chunk request (default 1.5s,
	// a little more than the time a copyset needs to replace a lost leader).
	// An attempt that gets no answer in time (its chunkserver paused, or
	// cut off) is given up and the request sent to whichever replica leads
	// then; each further attempt of the request that times out doubles it,
	// up to 10s, so a slow but working chunkserver is not flooded. Retries
	// are safe: copysets apply a retried write once.
	AttemptTimeout time.Duration
	// MaxInflight bounds chunk requests in flight for the volume (default
	// 256).
	MaxInflight int
	// MaxInflightBytes bounds the data of the chunk requests in flight for
	// the volume (pieces of reads, writes and zeroing unmaps): an IO that
	// would exceed it waits until earlier pieces completed (default
	// DefaultMaxInflightBytes; at least one piece, 1 MiB).
	MaxInflightBytes int64
	// TLS is this process's identity (a certificate with the client role)
	// for mutual TLS with the MDS and the chunkservers; nil: plaintext.
	TLS    *certs.Source
	Logger *slog.Logger
	// TestingKnobs are hooks for tests; zero in production.
	TestingKnobs TestingKnobs
}

// DefaultMaxInflightBytes is the default of Options.MaxInflightBytes.
const DefaultMaxInflightBytes = 64 << 20

// TestingKnobs are hooks for tests.
type TestingKnobs struct {
	// OnInflightBytes, when set, is called with the volume's bytes of
	// chunk requests in flight each time a piece is admitted.
	OnInflightBytes func(int64)
}

// Stats count what a volume handle did, for metrics.
type Stats struct {
	Reads, Writes, Unmaps   uint64 // IOs completed
	ReadBytes, WrittenBytes uint64
	ChunkRequests           uint64 // pieces sent to chunkservers
	Retries, Redirects      uint64
	SegmentsAllocated       uint64
	Errors                  uint64
	InflightBytes           int64 // data of chunk requests in flight now
}

// Volume is an open volume. Its methods are safe for concurrent use.
type Volume struct {
	name string
	opts Options
	log  *slog.Logger
	mds  *mdsclient.Conn

	id      uint64
	ws      atomic.Pointer[writeState]
	snap    uint64 // the snapshot's sequence number (snapshot handles)
	session string
	// renewing is the renewal in flight (renew), under renewMu.
	renewMu   sync.Mutex
	renewing  *renewal
	lease     time.Duration
	chunkSize int64
	segSize   int64
	blockSize int64
	pieceSize int64
	unit      int64 // page of a clone chunk's owned pages (geometry.CopyUnit)
	size      atomic.Int64

	// A clone's source (clone.go), and the snapshot handle reading it.
	src    atomic.Pointer[cloneSource]
	parent parentHandle
	// volEpoch is the volume's newest epoch this handle heard of (what a
	// flatten's fills carry).
	volEpoch atomic.Uint64

	r    *router
	reqs *requests // numbers writes and deletes for at-most-once application

	sem    chan struct{}
	budget byteBudget // bytes of pieces in flight
	fenced atomic.Bool
	gone   atomic.Bool // the snapshot this handle reads was deleted
	// confirmed is when the MDS last answered this handle's session
	// (UnixNano): a snapshot handle reads only within a lease of it.
	confirmed atomic.Int64
	closed    atomic.Bool
	stop      chan struct{}
	ctx       context.Context // cancelled by Close: IO in flight stops
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	stats struct {
		reads, writes, unmaps, readBytes, writtenBytes, chunkReqs, retries, redirects, allocs, errors atomic.Uint64
	}
}

// Open opens a volume for writing with default options. Opening for writing
// fences every earlier writer of the volume.
func Open(ctx context.Context, mdsAddrs []string, volume string) (*Volume, error) {
	return OpenWithOptions(ctx, mdsAddrs, volume, Options{})
}

// OpenWithOptions opens a volume.
func OpenWithOptions(ctx context.Context, mdsAddrs []string, volume string, o Options) (*Volume, error) {
	if o.RetryTimeout <= 0 {
		o.RetryTimeout = 60 * time.Second
	}
	if o.MaxInflight <= 0 {
		o.MaxInflight = 256
	}
	if o.AttemptTimeout <= 0 {
		o.AttemptTimeout = 1500 * time.Millisecond
	}
	if o.MaxInflightBytes <= 0 {
		o.MaxInflightBytes = DefaultMaxInflightBytes
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.ClientName == "" {
		h, _ := os.Hostname()
		o.ClientName = fmt.Sprintf("%s/pid-%d", h, os.Getpid())
	}
	conn, err := mdsclient.Dial(mdsAddrs, mdsclient.Options{Logger: o.Logger, RetryBudget: o.RetryTimeout, TLS: o.TLS})
	if err != nil {
		return nil, fmt.Errorf("client: connect to the MDS: %w", err)
	}
	if o.Snapshot != "" {
		o.ReadOnly = true
	}
	resp, err := conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: volume, Writable: !o.ReadOnly, Client: o.ClientName, Node: o.Node,
		Features: []string{cloneFeature}})
	if err != nil {
		conn.Close()
		switch {
		case status.Code(err) == codes.NotFound:
			return nil, fmt.Errorf("%w: %s", ErrNotFound, volume)
		case status.Code(err) == codes.Unavailable || status.Code(err) == codes.DeadlineExceeded || errors.Is(err, context.DeadlineExceeded):
			return nil, fmt.Errorf("client: open volume %s: %w: %w", volume, ErrUnavailable, err)
		}
		return nil, fmt.Errorf("client: open volume %s: %w", volume, err)
	}
	vol, consts := resp.GetVolume(), resp.GetConstants()
	v := &Volume{
		name:      volume,
		opts:      o,
		log:       o.Logger.With("component", "client", "volume", volume),
		mds:       conn,
		id:        vol.GetId(),
		session:   resp.GetSession().GetSessionId(),
		lease:     time.Duration(resp.GetLeaseSeconds()) * time.Second,
		chunkSize: int64(vol.GetChunkSize()),
		segSize:   int64(vol.GetSegmentSize()),
		blockSize: int64(consts.GetBlockSize()),
		sem:       make(chan struct{}, o.MaxInflight),
		stop:      make(chan struct{}),
	}
	v.ctx, v.cancel = context.WithCancel(context.Background())
	v.ws.Store(&writeState{})
	if !o.ReadOnly {
		v.adopt(vol)
	}
	size := int64(vol.GetSize())
	if o.Snapshot != "" {
		snap := vol.LiveSnapshot(o.Snapshot)
		if snap == nil {
			_, _ = conn.Volumes().CloseVolume(ctx, &mdspb.CloseVolumeRequest{Name: volume, SessionId: v.sessionID()})
			conn.Close()
			return nil, fmt.Errorf("%w: volume %s has no snapshot %q", ErrNotFound, volume, o.Snapshot)
		}
		v.snap, size = snap.GetSeq(), int64(snap.GetSize())
		v.log = v.log.With("snapshot", o.Snapshot)
	}
	if v.chunkSize <= 0 || v.segSize <= 0 || v.segSize%v.chunkSize != 0 {
		conn.Close()
		return nil, fmt.Errorf("client: volume %s has an invalid geometry (chunk %d, segment %d)", volume, v.chunkSize, v.segSize)
	}
	if v.blockSize <= 0 {
		v.blockSize = 512
	}
	metaPage := int64(consts.GetMetaPageSize())
	if metaPage <= 0 {
		metaPage = geometry.DefaultMetaPageSize
	}
	v.unit = geometry.CopyUnit(v.chunkSize, metaPage, v.blockSize)
	v.noteVolume(vol)
	// Pieces stay well under what a chunkserver takes in one request (a
	// quarter of a chunk file).
	v.pieceSize = min(1<<20, v.chunkSize/8)
	v.budget = byteBudget{max: max(o.MaxInflightBytes, v.pieceSize), observe: o.TestingKnobs.OnInflightBytes}
	v.size.Store(size)
	v.r = newRouter(v)
	v.reqs = newRequests()
	if v.lease <= 0 {
		v.lease = 30 * time.Second
	}
	v.confirmed.Store(time.Now().UnixNano())
	v.wg.Add(1)
	go v.refreshLoop()
	v.log.Debug("volume opened", "id", v.id, "epoch", v.Epoch(), "size", v.Size())
	return v, nil
}

// Name is the volume's name.
func (v *Volume) Name() string { return v.name }

// Size is the volume's length in bytes; it grows when the volume is extended.
func (v *Volume) Size() int64 { return v.size.Load() }

// BlockSize is the IO granularity: offsets and lengths are multiples of it.
func (v *Volume) BlockSize() int64 { return v.blockSize }

// ReadOnly reports a handle that cannot write (Options.ReadOnly, or a
// snapshot).
func (v *Volume) ReadOnly() bool { return v.opts.ReadOnly }

// Epoch is the write epoch this handle holds (0 when read-only).
func (v *Volume) Epoch() uint64 { return v.ws.Load().epoch }

// writeState is what a writer's requests carry: the volume's epoch, its
// sequence number and its newest live snapshot's. A snapshot raises all
// three at once; the handle takes them together (adopt).
type writeState struct {
	epoch, sn, keep uint64
}

// adopt takes a writer's state from the volume's record, when it is newer
// than the handle's.
func (v *Volume) adopt(vol *mdspb.Volume) bool {
	for {
		cur := v.ws.Load()
		if vol.GetEpoch() <= cur.epoch {
			return false
		}
		next := &writeState{epoch: vol.GetEpoch(), sn: vol.WriteSeq(), keep: vol.NewestLiveSnapshot()}
		if v.ws.CompareAndSwap(cur, next) {
			if cur.epoch != 0 {
				v.log.Info("volume moved to a new sequence number (a snapshot was taken)", "epoch", next.epoch, "seq", next.sn)
			}
			return true
		}
	}
}

// renew asks the MDS about this writer's session after a chunkserver
// refused its epoch: a snapshot raised the epoch (the session stands: the
// handle takes the new epoch and retries), or another writer opened the
// volume (the session is fenced). One question is in flight at a time;
// every IO refused meanwhile waits for its answer, or for its own end. An
// MDS that cannot be asked leaves the question open (err).
func (v *Volume) renew(ctx context.Context, refused uint64) (retry bool, err error) {
	if v.ws.Load().epoch > refused {
		return true, nil // renewed meanwhile
	}
	v.renewMu.Lock()
	r := v.renewing
	if r == nil {
		r = &renewal{done: make(chan struct{})}
		v.renewing = r
		go v.askMDS(r)
	}
	v.renewMu.Unlock()
	select {
	case <-r.done:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	if r.err != nil {
		return false, r.err
	}
	return !r.fenced && v.ws.Load().epoch > refused, nil
}

// renewal is one question to the MDS about the writer's session.
type renewal struct {
	done   chan struct{}
	fenced bool
	err    error
}

// renewTimeout bounds one renewal's RefreshSession.
const renewTimeout = 5 * time.Second

func (v *Volume) askMDS(r *renewal) {
	ctx, cancel := context.WithTimeout(v.ctx, renewTimeout)
	resp, err := v.mds.Volumes().RefreshSession(ctx, &mdspb.RefreshSessionRequest{Name: v.name, SessionId: v.sessionID()})
	cancel()
	switch {
	case status.Code(err) == codes.FailedPrecondition || status.Code(err) == codes.NotFound:
		r.fenced = true
		if !v.fenced.Swap(true) {
			v.log.Warn("fenced: the volume was opened for writing by another client", "detail", err)
		}
	case err != nil:
		r.err = err
	default:
		v.adopt(resp.GetVolume())
		v.noteVolume(resp.GetVolume())
	}
	v.renewMu.Lock()
	v.renewing = nil
	v.renewMu.Unlock()
	close(r.done)
}

// Stats returns the handle's counters.
func (v *Volume) Stats() Stats {
	s := &v.stats
	return Stats{
		Reads: s.reads.Load(), Writes: s.writes.Load(), Unmaps: s.unmaps.Load(),
		ReadBytes: s.readBytes.Load(), WrittenBytes: s.writtenBytes.Load(),
		ChunkRequests: s.chunkReqs.Load(), Retries: s.retries.Load(), Redirects: s.redirects.Load(),
		SegmentsAllocated: s.allocs.Load(), Errors: s.errors.Load(),
		InflightBytes: v.budget.inUse(),
	}
}

// Flush returns once every write that completed before it is durable. Writes
// are durable on a quorum when they return, so Flush only reports whether the
// handle is still usable (and ctx's error when it has ended).
func (v *Volume) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if v.closed.Load() {
		return ErrClosed
	}
	if v.fenced.Load() {
		return ErrFenced
	}
	return nil
}

// Close ends the session and releases connections. IO in flight fails with
// ErrClosed or completes.
func (v *Volume) Close() error {
	if !v.closed.CompareAndSwap(false, true) {
		return nil
	}
	close(v.stop)
	v.cancel()
	v.wg.Wait()
	v.closeParent()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := v.mds.Volumes().CloseVolume(ctx, &mdspb.CloseVolumeRequest{Name: v.name, SessionId: v.sessionID()})
	v.r.close()
	v.mds.Close()
	if err != nil && status.Code(err) != codes.NotFound {
		return fmt.Errorf("client: close session of %s: %w", v.name, err)
	}
	return nil
}

// refreshLoop renews the MDS session and picks up size changes.
func (v *Volume) refreshLoop() {
	defer v.wg.Done()
	t := time.NewTicker(max(v.lease/3, 200*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-v.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), v.lease/2)
		resp, err := v.mds.Volumes().RefreshSession(ctx, &mdspb.RefreshSessionRequest{Name: v.name, SessionId: v.sessionID()})
		cancel()
		if err != nil {
			if v.Epoch() != 0 && status.Code(err) == codes.FailedPrecondition {
				// The MDS fenced the session: the volume was opened for
				// writing again. Chunkservers that cannot confirm epochs
				// (cut off from the MDS) answer this handle's writes with
				// UNAVAILABLE, not EPOCH_TOO_OLD; it learns it here.
				if !v.fenced.Swap(true) {
					v.log.Warn("volume opened for writing elsewhere; this handle is fenced", "detail", err)
				}
				continue
			}
			if v.snap != 0 && status.Code(err) == codes.NotFound {
				// The session expired (the MDS was away for a lease) or the
				// volume is gone: a snapshot handle opens a new session.
				v.reopenSnapshot()
				continue
			}
			// IO goes on without the MDS while the chunkservers' epoch
			// leases last: the epoch, not the session, keeps writers apart.
			v.log.Warn("cannot renew the volume session", "err", err)
			continue
		}
		v.confirmed.Store(time.Now().UnixNano())
		v.noteVolume(resp.GetVolume())
		if sz := int64(resp.GetVolume().GetSize()); sz > v.size.Load() && v.snap == 0 {
			v.log.Info("volume grew", "size", sz)
			v.size.Store(sz)
		}
		// The session stands: a newer epoch is a snapshot's.
		if v.Epoch() != 0 {
			v.adopt(resp.GetVolume())
		}
		if s := resp.GetVolume().LiveSnapshot(v.opts.Snapshot); v.snap != 0 && (s == nil || s.GetSeq() != v.snap) && !v.gone.Swap(true) {
			v.log.Warn("the snapshot this handle reads was deleted")
		}
	}
}

// sessionID is the handle's MDS session (a snapshot handle may open a new
// one when its own expired).
func (v *Volume) sessionID() string {
	v.renewMu.Lock()
	defer v.renewMu.Unlock()
	return v.session
}

// reopenSnapshot gives a snapshot handle a new session after its own
// expired, if its volume and snapshot are still there; otherwise the
// handle fails from then on.
func (v *Volume) reopenSnapshot() {
	ctx, cancel := context.WithTimeout(v.ctx, v.lease/2)
	defer cancel()
	resp, err := v.mds.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: v.name, Client: v.opts.ClientName, Node: v.opts.Node})
	switch {
	case status.Code(err) == codes.NotFound:
		if !v.gone.Swap(true) {
			v.log.Warn("the volume of the snapshot this handle reads was deleted", "detail", err)
		}
		return
	case err != nil:
		v.log.Warn("cannot open a new session for the snapshot", "err", err)
		return
	}
	if s := resp.GetVolume().LiveSnapshot(v.opts.Snapshot); s == nil || s.GetSeq() != v.snap {
		if !v.gone.Swap(true) {
			v.log.Warn("the snapshot this handle reads was deleted")
		}
		_, _ = v.mds.Volumes().CloseVolume(ctx, &mdspb.CloseVolumeRequest{Name: v.name, SessionId: resp.GetSession().GetSessionId()})
		return
	}
	v.renewMu.Lock()
	v.session = resp.GetSession().GetSessionId()
	v.renewMu.Unlock()
	v.confirmed.Store(time.Now().UnixNano())
	v.log.Info("new session for the snapshot (the last one expired)")
}

// Refresh asks the MDS for the volume's current size now (for callers that
// just extended it); for a snapshot handle, whether the snapshot is still
// there (ErrNotFound when it was deleted).
func (v *Volume) Refresh(ctx context.Context) error {
	resp, err := v.mds.Volumes().RefreshSession(ctx, &mdspb.RefreshSessionRequest{Name: v.name, SessionId: v.sessionID()})
	if err != nil {
		return fmt.Errorf("client: refresh %s: %w", v.name, err)
	}
	v.confirmed.Store(time.Now().UnixNano())
	v.noteVolume(resp.GetVolume())
	if sz := int64(resp.GetVolume().GetSize()); sz > v.size.Load() && v.snap == 0 {
		v.size.Store(sz)
	}
	if s := resp.GetVolume().LiveSnapshot(v.opts.Snapshot); v.snap != 0 && (s == nil || s.GetSeq() != v.snap) {
		v.gone.Store(true)
		return fmt.Errorf("%w: snapshot %q of volume %s was deleted", ErrNotFound, v.opts.Snapshot, v.name)
	}
	return nil
}

func (v *Volume) usable(write bool) error {
	switch {
	case v.closed.Load():
		return ErrClosed
	case v.fenced.Load():
		return ErrFenced
	case v.gone.Load():
		return fmt.Errorf("%w: snapshot %q of volume %s was deleted", ErrNotFound, v.opts.Snapshot, v.name)
	case v.snap != 0 && time.Since(time.Unix(0, v.confirmed.Load())) > v.lease:
		// A deleted snapshot's data is given back a session lease after
		// the deletion: a handle that could not ask the MDS for as long
		// cannot tell that what it reads is still the snapshot's.
		return fmt.Errorf("%w: snapshot %q of volume %s not confirmed by the MDS for a session lease (%v)", ErrUnavailable, v.opts.Snapshot, v.name, v.lease)
	case write && v.opts.ReadOnly:
		return ErrReadOnly
	}
	return nil
}
