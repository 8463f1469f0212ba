package wire

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// Pool keeps one Client per address, dialled on first use and again after
// its connection broke.
type Pool struct {
	opts        ClientOptions
	dialTimeout time.Duration

	mu      sync.Mutex
	entries map[string]*poolEntry
	closed  bool
}

type poolEntry struct {
	mu    sync.Mutex // held while dialling
	c     *Client
	err   error         // of the last dial
	tries atomic.Uint64 // dials so far
}

// NewPool returns an empty pool whose clients use opts.
func NewPool(opts ClientOptions) *Pool {
	return &Pool{opts: opts, dialTimeout: 5 * time.Second, entries: map[string]*poolEntry{}}
}

// Get returns a live client for addr, dialling when there is none. Callers
// that find it broken later just call Get again.
func (p *Pool) Get(ctx context.Context, addr string) (*Client, error) {
	if addr == "" {
		return nil, fmt.Errorf("wire: no address to dial")
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	e := p.entries[addr]
	if e == nil {
		e = &poolEntry{}
		p.entries[addr] = e
	}
	p.mu.Unlock()
	tries := e.tries.Load()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.c != nil && e.c.Err() == nil {
		return e.c, nil
	}
	if e.tries.Load() != tries && e.err != nil {
		return nil, e.err // a dial failed while this caller waited for it
	}
	dctx, cancel := context.WithTimeout(ctx, p.dialTimeout)
	defer cancel()
	c, err := Dial(dctx, addr, p.opts)
	e.tries.Add(1)
	e.err = err
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed {
		_ = c.Close()
		return nil, ErrClosed
	}
	e.c = c
	return c, nil
}

// Close closes every client; Get fails afterwards.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	entries := p.entries
	p.entries = map[string]*poolEntry{}
	p.mu.Unlock()
	for _, e := range entries {
		e.mu.Lock()
		if e.c != nil {
			_ = e.c.Close()
		}
		e.mu.Unlock()
	}
}
