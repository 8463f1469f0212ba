package gateway

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/internal/units"
)

// ErrFenced is wrapped by the errors of a volume that a newer writer fenced
// (opened the volume for writing after it): none of its writes will succeed
// again. The default opener translates the client library's error into it.
var ErrFenced = errors.New("gateway: volume fenced by a newer writer")

// ErrVolumeGone is returned by every IO of a volume the MDS stopped listing
// (deleted or renamed) to the users that still have it open.
var ErrVolumeGone = errors.New("gateway: volume no longer listed by the MDS (deleted or renamed)")

// openTimeout bounds one open of a volume (the client retries inside it).
const openTimeout = time.Minute

// pollTimeout bounds the ListVolumes call of one poll; a poll that fails is
// simply retried at the next tick.
const pollTimeout = 5 * time.Second

// registry holds the gateway's open volumes: at most one open per volume
// name at a time, shared by every user.
type registry struct {
	g *Gateway

	mu     sync.Mutex
	byName map[string]*entry   // the entry new users of a name join
	live   map[*entry]struct{} // every entry not closed yet
	closed bool
}

// entry is one open (or opening) volume.
type entry struct {
	name  string
	ready chan struct{} // closed once vol or err is set
	vol   blockdev.Device
	err   error
	// opened is when the open completed; the poll loop only judges entries
	// opened before its volume list was read.
	opened   time.Time
	fenced   atomic.Bool
	vanished atomic.Bool  // the MDS stopped listing it: IO is refused
	size     atomic.Int64 // size last seen by the poll loop

	// Guarded by registry.mu.
	refs      int
	linger    *time.Timer
	lingerGen int  // identifies the current linger timer
	gone      bool // detached from byName: no new users join it
	closing   bool // Close was or is being called
}

func newRegistry(g *Gateway) *registry {
	return &registry{g: g, byName: map[string]*entry{}, live: map[*entry]struct{}{}}
}

// acquire returns the open volume of name, opening it if no user has it
// open, and counts the caller as a user until it calls release.
func (r *registry) acquire(ctx context.Context, name string) (*entry, error) {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrStopped
	}
	e := r.byName[name]
	if e == nil {
		e = &entry{name: name, ready: make(chan struct{})}
		r.byName[name] = e
		r.live[e] = struct{}{}
		// The open outlives this caller: others may join it, and a caller
		// that gives up must not fail them.
		go r.open(e)
	}
	e.refs++
	if e.linger != nil {
		e.linger.Stop()
		e.linger = nil
	}
	r.mu.Unlock()
	// The open waits for the MDS only: a caller that cannot wait any more
	// hears that the MDS does not answer (blockdev.ErrUnavailable: the
	// frontends say "try again later", never "no such export"). The
	// frontends name the volume.
	// An MDS that answers its polls meanwhile is alive and the open only
	// slow (after an MDS restart an open waits out the writers' epoch
	// lease): then the caller waits on, as long as its own deadline lets it.
	start := time.Now()
	wait := time.NewTimer(r.g.cfg.MDSWait)
	defer wait.Stop()
	for waiting := true; waiting; {
		select {
		case <-e.ready:
			waiting = false
		case <-wait.C:
			if !r.g.metrics.polledSince(start) {
				r.release(e)
				return nil, r.g.mdsSilent(time.Since(start), nil)
			}
			wait.Reset(2 * r.g.cfg.PollInterval)
			start = time.Now()
		case <-ctx.Done():
			r.release(e)
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				if r.g.metrics.polledSince(start) {
					return nil, fmt.Errorf("%w: the open of volume %q takes longer than this user may wait (the MDS answers; after its restart an open waits out the last writer's lease): %w",
						blockdev.ErrUnavailable, name, ctx.Err())
				}
				return nil, r.g.mdsSilent(time.Since(start), ctx.Err())
			}
			return nil, fmt.Errorf("wait for the open: %w", ctx.Err())
		}
	}
	if e.err != nil {
		r.release(e)
		return nil, e.err
	}
	return e, nil
}

// open opens e's volume and publishes the result.
func (r *registry) open(e *entry) {
	ctx, cancel := context.WithTimeout(r.g.ctx, openTimeout)
	start := time.Now()
	vol, err := r.g.cfg.OpenVolume(ctx, e.name)
	cancel()
	r.mu.Lock()
	if err != nil {
		e.err = err
		r.detachLocked(e)
		delete(r.live, e)
		r.mu.Unlock()
		close(e.ready)
		r.g.metrics.openErrors.Inc()
		if errors.Is(err, blockdev.ErrNotFound) {
			r.g.log.Info("volume not found", "volume", e.name)
		} else {
			r.g.log.Warn("open volume failed", "volume", e.name, "err", err)
		}
		return
	}
	e.vol = vol
	e.opened = time.Now()
	e.size.Store(vol.Size())
	idle := e.refs == 0
	r.mu.Unlock()
	close(e.ready)
	r.g.metrics.opens.Inc()
	r.g.metrics.volumes.start(e.name)
	r.g.log.Info("volume opened", "volume", e.name, "size", units.FormatBytes(uint64(max(vol.Size(), 0))),
		"took", time.Since(start).Round(time.Millisecond))
	if idle {
		// Every caller gave up while it opened.
		r.idle(e)
	}
}

// release drops one user of e.
func (r *registry) release(e *entry) {
	r.mu.Lock()
	e.refs--
	last := e.refs == 0
	r.mu.Unlock()
	if !last {
		return
	}
	select {
	case <-e.ready:
	default:
		return // open still running; it handles an entry nobody waits for
	}
	if e.err == nil {
		r.idle(e)
	}
}

// idle handles an open entry whose last user left: it lingers, unless it
// must go at once (vanished, fenced, gateway stopping, no linger).
func (r *registry) idle(e *entry) {
	r.mu.Lock()
	if e.refs > 0 || e.closing {
		r.mu.Unlock()
		return
	}
	if e.gone || e.fenced.Load() || r.closed || r.g.cfg.Linger < 0 {
		r.detachLocked(e)
		e.closing = true
		r.mu.Unlock()
		_ = r.closeVolume(e)
		return
	}
	if e.linger == nil {
		e.lingerGen++
		gen := e.lingerGen
		e.linger = time.AfterFunc(r.g.cfg.Linger, func() { r.expire(e, gen) })
	}
	r.mu.Unlock()
}

// expire closes a lingering entry that nobody joined meanwhile.
func (r *registry) expire(e *entry, gen int) {
	r.mu.Lock()
	if e.refs > 0 || e.closing || e.linger == nil || e.lingerGen != gen {
		r.mu.Unlock()
		return
	}
	e.linger = nil
	r.detachLocked(e)
	e.closing = true
	r.mu.Unlock()
	_ = r.closeVolume(e)
}

// detachLocked stops new users from joining e.
func (r *registry) detachLocked(e *entry) {
	if r.byName[e.name] == e {
		delete(r.byName, e.name)
	}
	e.gone = true
}

// closeVolume flushes and closes e's volume; e must be marked closing.
func (r *registry) closeVolume(e *entry) error {
	var errs []error
	if !e.fenced.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
		err := e.vol.Flush(ctx)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("flush: %w", err))
		}
	}
	if err := e.vol.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close: %w", err))
	}
	r.mu.Lock()
	delete(r.live, e)
	r.mu.Unlock()
	r.g.metrics.closes.Inc()
	r.g.metrics.volumes.forget(e.name)
	if err := errors.Join(errs...); err != nil {
		r.g.log.Warn("close volume", "volume", e.name, "err", err)
		return fmt.Errorf("volume %q: %w", e.name, err)
	}
	r.g.log.Info("volume closed", "volume", e.name)
	return nil
}

// vanish detaches the entry of a volume the MDS no longer lists: nobody
// joins it any more and it closes as soon as its users are gone.
func (r *registry) vanish(e *entry) {
	e.vanished.Store(true)
	r.mu.Lock()
	r.detachLocked(e)
	if e.linger != nil {
		e.linger.Stop()
		e.linger = nil
	}
	r.mu.Unlock()
	r.idle(e)
}

// openEntries returns the entries that have an open volume and accept users.
func (r *registry) openEntries() []*entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*entry
	for _, e := range r.byName {
		select {
		case <-e.ready:
			if e.err == nil {
				out = append(out, e)
			}
		default:
		}
	}
	return out
}

// snapshot returns the open volumes with their user counts.
func (r *registry) snapshot() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for e := range r.live {
		select {
		case <-e.ready:
			if e.err == nil && !e.closing {
				out[e.name] += e.refs
			}
		default:
		}
	}
	return out
}

// closeAll closes every volume; later acquires fail with ErrStopped. The
// frontends are closed first, so nobody uses the volumes any more.
func (r *registry) closeAll() error {
	r.mu.Lock()
	r.closed = true
	var all []*entry
	for e := range r.live {
		all = append(all, e)
	}
	r.mu.Unlock()
	var errs []error
	for _, e := range all {
		<-e.ready // opens end quickly: the gateway's context is cancelled
		r.mu.Lock()
		if e.err != nil || e.closing {
			r.mu.Unlock()
			continue
		}
		if e.refs > 0 {
			r.g.log.Warn("closing a volume that still has users", "volume", e.name, "users", e.refs)
		}
		if e.linger != nil {
			e.linger.Stop()
			e.linger = nil
		}
		r.detachLocked(e)
		e.closing = true
		r.mu.Unlock()
		if err := r.closeVolume(e); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// handle is one user's view of an open volume: what a frontend gets from
// Open. Its Close releases the user once.
type handle struct {
	r      *registry
	e      *entry
	closed atomic.Bool
}

// ReadAt reads through the shared volume.
func (h *handle) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if h.e.vanished.Load() {
		return 0, fmt.Errorf("read %q: %w", h.e.name, ErrVolumeGone)
	}
	start := time.Now()
	n, err := h.e.vol.ReadAt(ctx, p, off)
	h.r.g.metrics.volumes.observe(h.e.name, "read", n, start, err)
	return n, err
}

// WriteAt writes through the shared volume.
func (h *handle) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if h.e.vanished.Load() {
		return 0, fmt.Errorf("write %q: %w", h.e.name, ErrVolumeGone)
	}
	start := time.Now()
	n, err := h.e.vol.WriteAt(ctx, p, off)
	h.r.g.metrics.volumes.observe(h.e.name, "write", n, start, err)
	if err != nil {
		h.noteErr(err)
	}
	return n, err
}

// UnmapAt unmaps through the shared volume.
func (h *handle) UnmapAt(ctx context.Context, off, length int64) error {
	if h.e.vanished.Load() {
		return fmt.Errorf("unmap %q: %w", h.e.name, ErrVolumeGone)
	}
	start := time.Now()
	err := h.e.vol.UnmapAt(ctx, off, length)
	h.r.g.metrics.volumes.observe(h.e.name, "unmap", 0, start, err)
	if err != nil {
		h.noteErr(err)
	}
	return err
}

// Flush flushes the shared volume.
func (h *handle) Flush(ctx context.Context) error {
	if h.e.vanished.Load() {
		return fmt.Errorf("flush %q: %w", h.e.name, ErrVolumeGone)
	}
	start := time.Now()
	err := h.e.vol.Flush(ctx)
	h.r.g.metrics.volumes.observe(h.e.name, "flush", 0, start, err)
	if err != nil {
		h.noteErr(err)
	}
	return err
}

// Map describes holes and data of the shared volume (blockdev.Mapper);
// a volume that cannot tell is all data.
func (h *handle) Map(ctx context.Context, off, length int64) ([]blockdev.Extent, error) {
	if h.e.vanished.Load() {
		return nil, fmt.Errorf("map %q: %w", h.e.name, ErrVolumeGone)
	}
	if m, ok := h.e.vol.(blockdev.Mapper); ok {
		return m.Map(ctx, off, length)
	}
	return []blockdev.Extent{{Length: length}}, nil
}

// Size is the shared volume's size.
func (h *handle) Size() int64 { return h.e.vol.Size() }

// ReadOnly reports an export that refuses writes (a snapshot).
func (h *handle) ReadOnly() bool { return blockdev.IsReadOnly(h.e.vol) }

// Description is what nbdinfo shows for the export.
func (h *handle) Description() string {
	return fmt.Sprintf("cairn volume %s (%s)", h.e.name, units.FormatBytes(uint64(max(h.e.vol.Size(), 0))))
}

// Close releases this user of the volume, once.
func (h *handle) Close() error {
	if h.closed.CompareAndSwap(false, true) {
		h.r.release(h.e)
	}
	return nil
}

// noteErr records that the volume was fenced, once: its current users get
// write errors, and the next user after them reopens it. The client library
// logs the fence (it notices it first, also without IO); the gateway counts
// it.
func (h *handle) noteErr(err error) {
	if errors.Is(err, ErrFenced) && h.e.fenced.CompareAndSwap(false, true) {
		h.r.g.metrics.fenced.Inc()
	}
}

// listVolumes returns the CREATED volumes the gateway exports, with sizes.
func (g *Gateway) listVolumes(ctx context.Context) (map[string]int64, error) {
	start := time.Now()
	resp, err := g.mds.Volumes().ListVolumes(ctx, &mdspb.ListVolumesRequest{})
	switch {
	case err == nil:
	case status.Code(err) == codes.DeadlineExceeded || errors.Is(err, context.DeadlineExceeded):
		return nil, fmt.Errorf("list volumes: %w", g.mdsSilent(time.Since(start), err))
	case status.Code(err) == codes.Unavailable:
		// mdsclient's error names the addresses it tried.
		return nil, fmt.Errorf("list volumes: %w: %w", blockdev.ErrUnavailable, err)
	default:
		return nil, fmt.Errorf("list volumes: %w", err)
	}
	out := map[string]int64{}
	for _, v := range resp.GetVolumes() {
		if v.GetStatus() == mdspb.VolumeStatus_VOLUME_STATUS_CREATED && g.exported(v.GetName()) {
			out[v.GetName()] = int64(v.GetSize())
			// Each readable snapshot too, read-only, as VOLUME@SNAPSHOT.
			for _, s := range v.GetSnapshots() {
				if s.GetStatus() == mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY {
					out[v.GetName()+"@"+s.GetName()] = int64(s.GetSize())
				}
			}
		}
	}
	return out, nil
}

// mdsSilent is the error of a wait for the MDS that ran out after waited:
// it wraps blockdev.ErrUnavailable and cause (when not nil), and names the
// MDS addresses.
func (g *Gateway) mdsSilent(waited time.Duration, cause error) error {
	err := fmt.Errorf("%w: the MDS (%s) has not answered in %v: unreachable or hung",
		blockdev.ErrUnavailable, strings.Join(g.cfg.MDSAddrs, ", "), waited.Round(100*time.Millisecond))
	if cause != nil {
		err = fmt.Errorf("%w (%w)", err, cause)
	}
	return err
}

// list returns the sorted names of the exported volumes.
func (g *Gateway) list(ctx context.Context) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, g.cfg.MDSWait)
	defer cancel()
	vols, err := g.listVolumes(ctx)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(vols))
	for n := range vols {
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}

// open is the frontends' Open: the shared open volume of name, for one user.
func (g *Gateway) open(ctx context.Context, name string) (*handle, error) {
	if !g.exported(name) {
		return nil, fmt.Errorf("%w: %q: %w", ErrNotExported, name, blockdev.ErrNotFound)
	}
	e, err := g.vols.acquire(ctx, name)
	if err != nil {
		return nil, err
	}
	return &handle{r: g.vols, e: e}, nil
}

// catalog is the gateway as both frontends see it: the exported volumes,
// each opened once and shared.
type catalog struct{ g *Gateway }

func (x catalog) List(ctx context.Context) ([]string, error) { return x.g.list(ctx) }

func (x catalog) Open(ctx context.Context, name string) (blockdev.Device, error) {
	h, err := x.g.open(ctx, name)
	if err != nil {
		return nil, err
	}
	return h, nil
}
