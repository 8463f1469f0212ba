// Package grpcconn caches gRPC client connections by address: the MDS, the
// client library and cairn-ops each talk to many chunkservers and keep one
// connection per chunkserver for as long as they run.
package grpcconn

import (
	"errors"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// ErrClosed is returned by Get after Close.
var ErrClosed = errors.New("grpcconn: cache closed")

// Cache holds one client connection per address, created on first use (gRPC
// connects lazily and reconnects by itself) and closed by Close.
type Cache struct {
	what string
	opts []grpc.DialOption

	mu     sync.Mutex
	conns  map[string]*grpc.ClientConn
	closed bool
}

// NewCache returns a cache whose connections use opts after the defaults
// (plaintext transport credentials, which opts may replace). what names
// the peers in errors ("chunkserver").
func NewCache(what string, opts ...grpc.DialOption) *Cache {
	all := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	return &Cache{what: what, opts: all, conns: map[string]*grpc.ClientConn{}}
}

// Get returns the connection to addr, creating it if needed.
func (c *Cache) Get(addr string) (*grpc.ClientConn, error) {
	if addr == "" {
		return nil, fmt.Errorf("%s has no known address", c.what)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if cc, ok := c.conns[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr, c.opts...)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", c.what, addr, err)
	}
	c.conns[addr] = cc
	return cc, nil
}

// Close closes every connection; Get fails afterwards.
func (c *Cache) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for a, cc := range c.conns {
		_ = cc.Close()
		delete(c.conns, a)
	}
}
