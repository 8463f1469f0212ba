package nemesis

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"cairn.io/cairn/internal/poll"
	"cairn.io/cairn/test/nemesis/nbdc"
)

// target is a volume as a client stream sees it.
type target interface {
	WriteAt(ctx context.Context, p []byte, off int64) error
	ReadAt(ctx context.Context, p []byte, off int64) error
}

// flusher is a target that can be asked to make completed writes durable
// (NBD_CMD_FLUSH, the client library's Flush). Every flushEvery-th
// operation of a worker is followed by a flush; flushes are not recorded
// (a write is durable when acknowledged).
type flusher interface {
	Flush(ctx context.Context) error
}

const flushEvery = 64

// KeysPerGen is the number of blocks per volume a generation writes and
// reads. A generation's blocks lie in KeysPerGen different chunks (so in
// many copysets); the next generation takes the next blocks of other
// chunks, so that a checked generation's history can be dropped.
const KeysPerGen = 16

// MaxGens is the number of generations a volume of VolSize holds.
const MaxGens = VolSize / chunkSize / KeysPerGen * (chunkSize / BlockSize)

// genKeys returns the blocks of generation g of a volume.
func genKeys(vol string, g int) []Key {
	stride := int64(VolSize / chunkSize / KeysPerGen) // chunks between keys
	perChunk := int64(chunkSize / BlockSize)
	gg := int64(g % MaxGens)
	keys := make([]Key, KeysPerGen)
	for i := range keys {
		chunk := int64(i)*stride + gg%stride
		block := (gg / stride) % perChunk
		keys[i] = Key{Vol: vol, Block: chunk*perChunk + block}
	}
	return keys
}

// opTimeout is how long a worker waits for one operation before it gives
// up on it (a write then has an unknown outcome).
const opTimeout = 30 * time.Second

// stream is one kind of client (the client library, or NBD through the
// gateway) with its workers.
type stream struct {
	name    string
	vol     string
	workers int
	h       *History
	// connect returns the stream's current target, reconnecting if the
	// last one broke; broken reports whether an error means that.
	connect func(ctx context.Context) (target, error)
	broken  func(t target, err error)

	gen atomic.Int64 // current generation

	mu          sync.Mutex
	completions []int64 // return times of successful operations
	workerGen   []int64 // generation each worker's current operation uses

	writes, writesUnknown, reads, readsFailed, abandoned, torn atomic.Int64
	lastErr                                                    atomic.Pointer[string]
}

// run runs the workers until ctx ends.
func (s *stream) run(ctx context.Context, seed uint64, clientBase int, wg *sync.WaitGroup) {
	s.workerGen = make([]int64, s.workers)
	for w := range s.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.worker(ctx, w, clientBase+w, rand.New(rand.NewPCG(seed, uint64(w))))
		}()
	}
}

func (s *stream) worker(ctx context.Context, w, client int, rng *rand.Rand) {
	buf := make([]byte, BlockSize)
	for n := 1; ctx.Err() == nil; n++ {
		g := s.gen.Load()
		s.mu.Lock()
		s.workerGen[w] = g
		s.mu.Unlock()
		keys := genKeys(s.vol, int(g))
		key := keys[rng.IntN(len(keys))]
		t, err := s.connect(ctx)
		if err != nil {
			s.noteErr(err)
			sleepCtx(ctx, 100*time.Millisecond)
			continue
		}
		off := key.Block * BlockSize
		if f, ok := t.(flusher); ok && n%flushEvery == 0 {
			if err := s.do(ctx, f.Flush); err != nil {
				s.failed(t, err)
			}
		}
		if rng.IntN(2) == 0 {
			v := s.h.NextValue()
			data := BlockOf(v)
			call := s.h.Now()
			err := s.do(ctx, func(c context.Context) error { return t.WriteAt(c, data, off) })
			ret := s.h.Now()
			if err == nil {
				s.h.Add(Op{Client: client, Key: key, Write: true, Value: v, Call: call, Return: ret})
				s.writes.Add(1)
				s.completed(ret)
			} else {
				s.h.Add(Op{Client: client, Key: key, Write: true, Value: v, Call: call, Return: Infinity})
				s.writesUnknown.Add(1)
				s.failed(t, err)
			}
		} else {
			call := s.h.Now()
			err := s.do(ctx, func(c context.Context) error { return t.ReadAt(c, buf, off) })
			ret := s.h.Now()
			if err == nil {
				v := ValueOf(buf)
				if v == Torn {
					s.torn.Add(1)
				}
				s.h.Add(Op{Client: client, Key: key, Value: v, Call: call, Return: ret})
				s.reads.Add(1)
				s.completed(ret)
			} else {
				s.readsFailed.Add(1)
				s.failed(t, err)
			}
		}
	}
}

// do runs one operation with opTimeout; a call that does not return by
// then is abandoned (it may still finish in the background).
func (s *stream) do(ctx context.Context, f func(context.Context) error) error {
	octx, cancel := context.WithTimeout(context.WithoutCancel(ctx), opTimeout)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- f(octx) }()
	select {
	case err := <-errc:
		return err
	case <-octx.Done():
		s.abandoned.Add(1)
		return fmt.Errorf("abandoned after %v", opTimeout)
	}
}

func (s *stream) completed(t int64) {
	s.mu.Lock()
	s.completions = append(s.completions, t)
	s.mu.Unlock()
}

func (s *stream) failed(t target, err error) {
	s.noteErr(err)
	if s.broken != nil {
		s.broken(t, err)
	}
}

func (s *stream) noteErr(err error) {
	msg := err.Error()
	s.lastErr.Store(&msg)
}

// switchGen moves the workers to generation g and waits (within ctx) until
// none still works on an older one.
func (s *stream) switchGen(ctx context.Context, g int64) error {
	s.gen.Store(g)
	return poll.Until(ctx, s.name+" workers to leave the old generation", func() error {
		s.mu.Lock()
		defer s.mu.Unlock()
		for w, wg := range s.workerGen {
			if wg < g {
				return fmt.Errorf("worker %d still in generation %d", w, wg)
			}
		}
		return nil
	})
}

// completedSince reports (as an error) whether an operation completed
// after t.
func (s *stream) completedSince(t int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.completions) - 1; i >= 0; i-- {
		if s.completions[i] > t {
			return nil
		}
	}
	return errors.New("no operation completed yet")
}

// stall returns the longest time within [from, to] without a completed
// operation, and forgets completions before to.
func (s *stream) stall(from, to int64) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	sort.Slice(s.completions, func(i, j int) bool { return s.completions[i] < s.completions[j] })
	longest, last := int64(0), from
	keep := s.completions[:0]
	for _, c := range s.completions {
		if c >= from && c <= to {
			longest = max(longest, c-last)
			last = c
		}
		if c > to {
			keep = append(keep, c)
		}
	}
	longest = max(longest, to-last)
	s.completions = keep
	return time.Duration(longest)
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// libStream writes one volume through the client library, in this
// process, all workers sharing one handle (a second writable handle would
// fence the first).
func libStream(h *History, mds string, workers int) *stream {
	s := &stream{name: "lib", vol: VolLib, workers: workers, h: h}
	var mu sync.Mutex
	var cur *libVolume
	s.connect = func(ctx context.Context) (target, error) {
		mu.Lock()
		defer mu.Unlock()
		if cur != nil {
			return cur, nil
		}
		octx, cancel := context.WithTimeout(ctx, opTimeout)
		defer cancel()
		v, err := openLib(octx, mds, VolLib, false)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", VolLib, err)
		}
		cur = v
		return v, nil
	}
	s.broken = func(t target, err error) {
		// The handle survives every transient failure (it retries); only
		// a closed or fenced handle is replaced.
		if !isPermanent(err) {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if cur == t {
			go cur.Close()
			cur = nil
		}
	}
	return s
}

// nbdStream writes the other volume through the gateway's NBD server, all
// workers sharing one connection (requests in flight at once).
func nbdStream(h *History, addr string, workers int) *stream {
	s := &stream{name: "nbd", vol: VolNBD, workers: workers, h: h}
	var mu sync.Mutex
	var cur *nbdc.Conn
	s.connect = func(ctx context.Context) (target, error) {
		mu.Lock()
		defer mu.Unlock()
		if cur != nil && cur.Err() == nil {
			return cur, nil
		}
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		c, err := nbdc.Dial(dctx, addr, VolNBD)
		if err != nil {
			return nil, err
		}
		cur = c
		return c, nil
	}
	s.broken = func(t target, err error) {
		// An NBD error reply (EIO while the cluster recovers) keeps the
		// connection; a lost connection is replaced by connect.
		var nerr *nbdc.Error
		if errors.As(err, &nerr) {
			return
		}
		if c, ok := t.(*nbdc.Conn); ok && c.Err() == nil {
			c.Close()
		}
	}
	return s
}
