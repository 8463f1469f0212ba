package transport

import (
	"math/rand"
	"sync"
	"time"
)

// Faults injects network faults into a Transport's outgoing messages. It is a
// test tool: seeded, so a run can be repeated, and safe for concurrent use.
// The zero value injects nothing; one Faults may be shared by every transport
// of a test cluster.
type Faults struct {
	mu sync.Mutex
	// DropRate, DuplicateRate and DelayRate are probabilities per message.
	dropRate, dupRate, delayRate float64
	// MaxDelay bounds injected delays (reordering follows from them).
	maxDelay  time.Duration
	rng       *rand.Rand
	blocked   map[[2]uint64]bool
	isolated  map[uint64]bool
	delivered uint64
}

// NewFaults returns a fault injector seeded with seed.
func NewFaults(seed int64) *Faults {
	return &Faults{rng: rand.New(rand.NewSource(seed)), blocked: map[[2]uint64]bool{}, isolated: map[uint64]bool{}}
}

// SetRates sets the per-message probabilities of dropping, duplicating and
// delaying (by up to maxDelay, which reorders messages).
func (f *Faults) SetRates(drop, duplicate, delay float64, maxDelay time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dropRate, f.dupRate, f.delayRate, f.maxDelay = drop, duplicate, delay, maxDelay
}

// Partition cuts traffic in both directions between a and b.
func (f *Faults) Partition(a, b uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.blocked[[2]uint64{a, b}] = true
	f.blocked[[2]uint64{b, a}] = true
}

// Cut cuts traffic from one node to another, one way: what to sends from
// still arrives.
func (f *Faults) Cut(from, to uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.blocked[[2]uint64{from, to}] = true
}

// Isolate cuts all traffic to and from node.
func (f *Faults) Isolate(node uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.isolated[node] = true
}

// Heal removes every partition and isolation (rates stay).
func (f *Faults) Heal() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.blocked = map[[2]uint64]bool{}
	f.isolated = map[uint64]bool{}
}

// Partitioned reports whether traffic from a to b is cut.
func (f *Faults) Partitioned(from, to uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.partitionedLocked(from, to)
}

func (f *Faults) partitionedLocked(from, to uint64) bool {
	return f.blocked[[2]uint64{from, to}] || f.isolated[from] || f.isolated[to]
}

// apply decides the fate of one message and calls deliver zero, one or two
// times, now or later.
func (f *Faults) apply(from, to uint64, deliver func() bool) bool {
	f.mu.Lock()
	if f.partitionedLocked(from, to) {
		f.mu.Unlock()
		return false
	}
	if f.dropRate > 0 && f.rng.Float64() < f.dropRate {
		f.mu.Unlock()
		return false
	}
	copies := 1
	if f.dupRate > 0 && f.rng.Float64() < f.dupRate {
		copies = 2
	}
	var delays [2]time.Duration
	for i := 0; i < copies; i++ {
		if f.delayRate > 0 && f.maxDelay > 0 && f.rng.Float64() < f.delayRate {
			delays[i] = time.Duration(f.rng.Int63n(int64(f.maxDelay)))
		}
	}
	f.delivered++
	f.mu.Unlock()
	ok := true
	for i := 0; i < copies; i++ {
		if delays[i] == 0 {
			ok = deliver() && ok
			continue
		}
		time.AfterFunc(delays[i], func() {
			// A partition raised meanwhile also cuts delayed messages.
			if !f.Partitioned(from, to) {
				deliver()
			}
		})
	}
	return ok
}
