package chunkserver

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/chunkfilepool/fsutil"
)

const epochsFile = "epochs.json"

// epochTable is the chunkserver's record of volume epochs: a request carrying
// an older epoch than the table's is refused. Epochs only ever rise. The
// table is durable: UpdateEpoch, table syncs from the MDS and raises by
// requests that carry a newer epoch are written through before they take
// effect.
//
// The table is trusted only under a lease from the MDS. Each heartbeat answer
// (which either carries the MDS's table or says ours is current) grants the
// lease until the time the heartbeat was sent plus the length the MDS names,
// measured on the monotonic clock. Without a valid lease the chunkserver
// serves no epoch-checked request: it may have missed an epoch push while cut
// off from the MDS, and the MDS lets a new writer go ahead once every
// chunkserver it could not reach has lost its lease.
//
// mu doubles as the fencing lock: a write holds it shared from its lease and
// epoch check until its proposal is queued; an update holds it exclusively.
type epochTable struct {
	path string

	mu      sync.RWMutex
	version uint64            // version of the MDS table last merged in
	epochs  map[uint64]uint64 // volume id -> epoch
	// leaseUntil is when the epoch lease ends (monotonic); zero until the
	// first sync with the MDS since start.
	leaseUntil time.Time
	// lastSync is when the heartbeat that last renewed the lease was sent,
	// and lease the length that heartbeat's answer granted.
	lastSync time.Time
	lease    time.Duration
}

type epochsOnDisk struct {
	Version uint64            `json:"version"`
	Epochs  map[string]uint64 `json:"epochs"`
}

func openEpochTable(dir string) (*epochTable, error) {
	t := &epochTable{path: filepath.Join(dir, epochsFile), epochs: map[uint64]uint64{}}
	b, err := os.ReadFile(t.path)
	if errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read epoch table: %w", err)
	}
	var d epochsOnDisk
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("epoch table %s is damaged: %w", t.path, err)
	}
	t.version = d.Version
	for k, v := range d.Epochs {
		id, err := strconv.ParseUint(k, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("epoch table %s: bad volume id %q", t.path, k)
		}
		t.epochs[id] = v
	}
	return t, nil
}

// saveLocked writes the table durably; mu held exclusively.
func (t *epochTable) saveLocked() error {
	d := epochsOnDisk{Version: t.version, Epochs: make(map[string]uint64, len(t.epochs))}
	for k, v := range t.epochs {
		d.Epochs[strconv.FormatUint(k, 10)] = v
	}
	b, err := json.Marshal(&d)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(t.path, b, 0o644); err != nil {
		return fmt.Errorf("save epoch table: %w", err)
	}
	return nil
}

// raise sets a volume's epoch to at least epoch, durably, and returns the
// epoch held afterwards.
func (t *epochTable) raise(volume, epoch uint64) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := t.epochs[volume]
	if epoch <= cur {
		return cur, nil
	}
	t.epochs[volume] = epoch
	if err := t.saveLocked(); err != nil {
		t.epochs[volume] = cur
		return cur, err
	}
	return epoch, nil
}

// sync takes a heartbeat answer: it raises every epoch to the MDS table's
// (when the answer carries one, with its version) and renews the lease until
// sent + lease, where sent is when the heartbeat was sent. A lease never
// moves back, and an answer that arrives after sent + lease renews nothing:
// the time the heartbeat spent on the way does not lengthen the lease. If the
// table cannot be saved, nothing changes.
func (t *epochTable) sync(table bool, version uint64, epochs map[uint64]uint64, sent time.Time, lease time.Duration) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if table {
		if err := t.mergeLocked(version, epochs); err != nil {
			return err
		}
	}
	if until := sent.Add(lease); lease > 0 && until.After(t.leaseUntil) {
		t.leaseUntil, t.lastSync, t.lease = until, sent, lease
	}
	return nil
}

// mergeLocked raises every epoch to the MDS table's and records its
// version; mu held exclusively.
func (t *epochTable) mergeLocked(version uint64, epochs map[uint64]uint64) error {
	changed := version != t.version
	old := make(map[uint64]uint64, len(t.epochs))
	for k, v := range t.epochs {
		old[k] = v
	}
	for vol, e := range epochs {
		if e > t.epochs[vol] {
			t.epochs[vol] = e
			changed = true
		}
	}
	if changed {
		prev := t.version
		t.version = version
		if err := t.saveLocked(); err != nil {
			t.epochs, t.version = old, prev
			return err
		}
	}
	return nil
}

func (t *epochTable) currentVersion() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.version
}

// leaseLeft is how long the lease still runs (0 or less when it ran out).
func (t *epochTable) leaseLeft(now time.Time) time.Duration {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if t.leaseUntil.IsZero() {
		return 0
	}
	return t.leaseUntil.Sub(now)
}

// errNoLease is returned by fence when the chunkserver holds no epoch lease.
var errNoLease = errors.New("no epoch lease")

// noLeaseError says why the lease is missing.
type noLeaseError struct {
	synced   bool          // synced with the MDS since start
	sinceAgo time.Duration // since the heartbeat that last renewed it was sent
	lease    time.Duration // the length it granted
}

func (e *noLeaseError) Error() string {
	if !e.synced {
		return "has not synced volume epochs with the MDS since it started"
	}
	return fmt.Sprintf("holds no epoch lease: it last synced volume epochs with the MDS %s ago and that lease of %s ran out %s ago",
		e.sinceAgo.Round(time.Millisecond), e.lease, (e.sinceAgo - e.lease).Round(time.Millisecond))
}

func (e *noLeaseError) Unwrap() error { return errNoLease }

// epochTooOldError is returned by fence for a request older than the table.
type epochTooOldError struct{ volume, current, got uint64 }

func (e *epochTooOldError) Error() string {
	return fmt.Sprintf("volume %d is at epoch %d; request carries %d: another client opened the volume for writing", e.volume, e.current, e.got)
}

// fence admits a request of volume carrying epoch: it checks the lease,
// raises the table durably when the request carries a newer epoch (the MDS
// hands out epochs; a client holds a newer one only because it opened the
// volume after the table was last updated), then checks the epoch. On
// success it returns holding the fencing lock shared: the caller queues its
// proposal and then calls release, so that an update either precedes the
// check or follows the proposal into the log. Volume 0 is never raised.
func (t *epochTable) fence(volume, epoch uint64) (release func(), err error) {
	for {
		t.mu.RLock()
		if release, decided, err := t.checkRLocked(volume, epoch); decided {
			return release, err
		}
		if _, err := t.raise(volume, epoch); err != nil {
			return nil, fmt.Errorf("raise volume %d to epoch %d: %w", volume, epoch, err)
		}
	}
}

// tryFence is fence for a caller that must not wait: decided is false, and
// nothing is held, when fence would wait for an update of the table in
// progress or would raise the table itself.
func (t *epochTable) tryFence(volume, epoch uint64) (release func(), decided bool, err error) {
	if !t.mu.TryRLock() {
		return nil, false, nil
	}
	return t.checkRLocked(volume, epoch)
}

// checkRLocked decides a request of volume at epoch with t.mu read-locked:
// admitted (release unlocks), refused (err, unlocked), or not decided
// (unlocked) when the table must first be raised to epoch.
func (t *epochTable) checkRLocked(volume, epoch uint64) (release func(), decided bool, err error) {
	now := time.Now()
	if !now.Before(t.leaseUntil) {
		e := &noLeaseError{synced: !t.leaseUntil.IsZero(), sinceAgo: now.Sub(t.lastSync), lease: t.lease}
		t.mu.RUnlock()
		return nil, true, e
	}
	cur := t.epochs[volume]
	switch {
	case epoch == cur, epoch > cur && volume == 0:
		return t.mu.RUnlock, true, nil
	case epoch < cur:
		t.mu.RUnlock()
		return nil, true, &epochTooOldError{volume: volume, current: cur, got: epoch}
	}
	t.mu.RUnlock()
	return nil, false, nil
}

// refusal turns an error of fence into the refusal a request answers with:
// no lease is UNAVAILABLE (retryable: it returns with the next heartbeat
// that reaches the MDS), an older epoch EPOCH_TOO_OLD.
func (s *Server) epochRefusal(err error) *reqError {
	var old *epochTooOldError
	switch {
	case errors.Is(err, errNoLease):
		return refuse(chunkpb.Status_STATUS_UNAVAILABLE, "chunkserver %d %v; epoch-checked requests resume once a heartbeat reaches the MDS", s.id.ChunkServerID, err)
	case errors.As(err, &old):
		return refuse(chunkpb.Status_STATUS_EPOCH_TOO_OLD, "%v", err)
	default:
		return refuse(chunkpb.Status_STATUS_INTERNAL_ERROR, "chunkserver %d: %v", s.id.ChunkServerID, err)
	}
}
