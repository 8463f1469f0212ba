package chunkserver

import (
	"context"
	"fmt"
	"sync"
	"time"

	"cairn.io/cairn/api/mdspb"
)

// resolver maps chunkserver ids to addresses through the MDS topology, with
// a short cache: peers may come back on another address after a restart.
type resolver struct {
	topo mdspb.TopologyServiceClient
	self uint64
	addr string
	ttl  time.Duration

	mu    sync.Mutex
	cache map[uint64]cachedAddr
}

type cachedAddr struct {
	addr string
	at   time.Time
}

func newResolver(conn interface {
	Topology() mdspb.TopologyServiceClient
}, self uint64, addr string) *resolver {
	return &resolver{topo: conn.Topology(), self: self, addr: addr, ttl: 5 * time.Second, cache: map[uint64]cachedAddr{}}
}

// Resolve implements transport.Resolver.
func (r *resolver) Resolve(ctx context.Context, id uint64) (string, error) {
	if addr, ok := r.fresh(id); ok {
		return addr, nil
	}
	resp, err := r.topo.GetChunkServer(ctx, &mdspb.GetChunkServerRequest{ChunkserverId: id})
	if err != nil {
		if addr := r.cached(id); addr != "" {
			return addr, nil // the MDS is away: keep using what we knew
		}
		return "", fmt.Errorf("resolve chunkserver %d: %w", id, err)
	}
	addr := resp.GetChunkserver().GetAddress()
	r.hint(id, addr)
	return addr, nil
}

// hint records an address learned elsewhere (copyset creation requests).
func (r *resolver) hint(id uint64, addr string) {
	if id == 0 || addr == "" || id == r.self {
		return
	}
	r.mu.Lock()
	r.cache[id] = cachedAddr{addr: addr, at: time.Now()}
	r.mu.Unlock()
}

// fresh returns the address of id when Resolve would answer it from the
// cache, without asking the MDS.
func (r *resolver) fresh(id uint64) (string, bool) {
	if id == r.self {
		return r.addr, true
	}
	r.mu.Lock()
	c, ok := r.cache[id]
	r.mu.Unlock()
	return c.addr, ok && time.Since(c.at) < r.ttl
}

// cached returns a known address without asking the MDS ("" if none).
func (r *resolver) cached(id uint64) string {
	if id == r.self {
		return r.addr
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cache[id].addr
}
