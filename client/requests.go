package client

import (
	"math/rand/v2"
	"sync"

	"cairn.io/cairn/api/chunkpb"
)

// requests numbers a volume handle's chunk writes and deletes, so that
// copysets apply each at most once however often it is retried: a leader
// may replicate a write and die before answering, its successor commits it,
// and the retry must not apply it a second time after later writes.
//
// Every request takes the next number when it starts and keeps it for all
// its attempts; each attempt also carries the lowest number still in
// flight, below which the copysets may forget what they applied.
type requests struct {
	client uint64 // random, non-zero

	mu   sync.Mutex
	next uint64          // the last number given out
	low  uint64          // lowest number not yet returned
	done map[uint64]bool // returned numbers above low
}

func newRequests() *requests {
	c := rand.Uint64()
	for c == 0 {
		c = rand.Uint64()
	}
	return &requests{client: c, low: 1, done: map[uint64]bool{}}
}

// begin numbers a new request.
func (r *requests) begin() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.next++
	return r.next
}

// end records that request seq returned to its caller, whatever the outcome.
func (r *requests) end(seq uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if seq != r.low {
		r.done[seq] = true
		return
	}
	r.low++
	for r.done[r.low] {
		delete(r.done, r.low)
		r.low++
	}
}

// attempt describes one attempt of request seq.
func (r *requests) attempt(seq uint64) *chunkpb.ClientRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return &chunkpb.ClientRequest{ClientId: r.client, Seq: seq, LowSeq: r.low}
}
