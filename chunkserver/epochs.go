package chunkserver

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

const epochsFile = "epochs.json"

// epochTable is the chunkserver's record of volume epochs: a write carrying
// an older epoch than the table's is refused. Epochs only ever rise. The
// table is durable: UpdateEpoch and table syncs from the MDS are written
// through before they are acknowledged.
//
// mu doubles as the fencing lock: a write holds it shared from its epoch
// check until its proposal is queued; an update holds it exclusively.
type epochTable struct {
	path string

	mu      sync.RWMutex
	version uint64            // version of the MDS table last merged in
	epochs  map[uint64]uint64 // volume id -> epoch
	synced  bool              // merged the MDS table since start
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

// merge raises every epoch to the MDS table's and records its version.
func (t *epochTable) merge(version uint64, epochs map[uint64]uint64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
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
	t.synced = true
	return nil
}

// markSynced records that the MDS had nothing newer for us.
func (t *epochTable) markSynced() {
	t.mu.Lock()
	t.synced = true
	t.mu.Unlock()
}

func (t *epochTable) currentVersion() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.version
}

// checkLocked compares a request's epoch with the table; mu held (shared).
func (t *epochTable) checkLocked(volume, epoch uint64) (current uint64, ok bool) {
	cur := t.epochs[volume]
	return cur, epoch >= cur
}
