package copyset

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// ClientRequest names one request of one client, so that the copyset
// applies it at most once however often the client sends it. A client
// retries a write whose answer it did not get; when the leader that
// replicated the first attempt died before answering, the entry is
// committed by its successor and the retry is a second entry. Applied
// twice, the write would land again after writes that came later, and a
// reader would see the block go back to an older value.
//
// A zero Client asks for no deduplication.
type ClientRequest struct {
	// Client is random per open volume handle.
	Client uint64
	// Seq numbers the client's requests; every retry carries the same one.
	Seq uint64
	// Low: every request of the client numbered below it has returned to
	// the client, so none of them can still be retried and the table may
	// forget them. An attempt of such a request arriving late is not
	// applied.
	Low uint64
}

// maxDedupClients bounds the clients a copyset remembers; beyond it the
// one whose last request is the oldest is forgotten.
const maxDedupClients = 4096

// dedupTable is the part of a copyset's state machine that records which
// client requests were applied. Like the chunk files it changes only by
// applying entries, in log order, so every replica holds the same table at
// the same index; it is saved with every checkpoint and sent with
// snapshots.
type dedupTable struct {
	clients map[uint64]*clientWindow
}

// clientWindow is what a copyset remembers of one client.
type clientWindow struct {
	low     uint64              // requests below were answered and are forgotten
	applied map[uint64]struct{} // applied requests at or above low
	last    uint64              // log index of the client's latest request
}

func newDedupTable() *dedupTable { return &dedupTable{clients: map[uint64]*clientWindow{}} }

// advance takes the client's low-water mark from an entry at index idx; it
// is idempotent, so an entry retried after a failed apply may pass again.
func (t *dedupTable) advance(r ClientRequest, idx uint64) {
	if r.Client == 0 {
		return
	}
	w := t.clients[r.Client]
	if w == nil {
		if len(t.clients) >= maxDedupClients {
			t.evictOldest()
		}
		w = &clientWindow{applied: map[uint64]struct{}{}}
		t.clients[r.Client] = w
	}
	w.last = max(w.last, idx)
	if r.Low > w.low {
		w.low = r.Low
		for s := range w.applied {
			if s < w.low {
				delete(w.applied, s)
			}
		}
	}
}

// applied reports whether the request was applied already, or was
// answered (below the client's low-water mark): then its entry is skipped.
func (t *dedupTable) applied(r ClientRequest) bool {
	if r.Client == 0 {
		return false
	}
	w := t.clients[r.Client]
	if w == nil {
		return false
	}
	if r.Seq < w.low {
		return true
	}
	_, ok := w.applied[r.Seq]
	return ok
}

// record notes that the request was applied.
func (t *dedupTable) record(r ClientRequest) {
	if r.Client == 0 {
		return
	}
	if w := t.clients[r.Client]; w != nil {
		w.applied[r.Seq] = struct{}{}
	}
}

// evictOldest forgets the client whose latest request is the oldest (ties
// by id: every replica evicts the same one).
func (t *dedupTable) evictOldest() {
	var victim uint64
	var oldest *clientWindow
	for id, w := range t.clients {
		if oldest == nil || w.last < oldest.last || (w.last == oldest.last && id < victim) {
			victim, oldest = id, w
		}
	}
	delete(t.clients, victim)
}

// clone returns a deep copy.
func (t *dedupTable) clone() *dedupTable {
	c := newDedupTable()
	for id, w := range t.clients {
		cw := &clientWindow{low: w.low, last: w.last, applied: make(map[uint64]struct{}, len(w.applied))}
		for s := range w.applied {
			cw.applied[s] = struct{}{}
		}
		c.clients[id] = cw
	}
	return c
}

// encode serialises the table deterministically:
//
//	clients u32 | per client, by id: id u64, low u64, last u64, n u32, n x seq u64 (ascending)
func (t *dedupTable) encode() []byte {
	if t == nil || len(t.clients) == 0 {
		return nil
	}
	ids := make([]uint64, 0, len(t.clients))
	for id := range t.clients {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(ids)))
	for _, id := range ids {
		w := t.clients[id]
		b = binary.LittleEndian.AppendUint64(b, id)
		b = binary.LittleEndian.AppendUint64(b, w.low)
		b = binary.LittleEndian.AppendUint64(b, w.last)
		seqs := make([]uint64, 0, len(w.applied))
		for s := range w.applied {
			seqs = append(seqs, s)
		}
		slices.Sort(seqs)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(seqs)))
		for _, s := range seqs {
			b = binary.LittleEndian.AppendUint64(b, s)
		}
	}
	return b
}

var errBadDedupTable = errors.New("copyset: malformed table of applied client requests")

// decodeDedupTable reads what encode wrote; nil or empty is an empty table.
func decodeDedupTable(b []byte) (*dedupTable, error) {
	t := newDedupTable()
	if len(b) == 0 {
		return t, nil
	}
	if len(b) < 4 {
		return nil, fmt.Errorf("%w: %d bytes", errBadDedupTable, len(b))
	}
	n := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if uint64(n) > uint64(len(b))/28 {
		return nil, fmt.Errorf("%w: %d clients in %d bytes", errBadDedupTable, n, len(b))
	}
	for range n {
		if len(b) < 28 {
			return nil, fmt.Errorf("%w: truncated client", errBadDedupTable)
		}
		id := binary.LittleEndian.Uint64(b)
		w := &clientWindow{low: binary.LittleEndian.Uint64(b[8:]), last: binary.LittleEndian.Uint64(b[16:])}
		k := binary.LittleEndian.Uint32(b[24:])
		b = b[28:]
		if uint64(k) > uint64(len(b))/8 {
			return nil, fmt.Errorf("%w: %d requests in %d bytes", errBadDedupTable, k, len(b))
		}
		w.applied = make(map[uint64]struct{}, k)
		for i := range k {
			w.applied[binary.LittleEndian.Uint64(b[8*i:])] = struct{}{}
		}
		b = b[8*k:]
		t.clients[id] = w
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("%w: %d bytes left over", errBadDedupTable, len(b))
	}
	return t, nil
}
