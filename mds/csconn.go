package mds

import (
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// chunkServerConns caches gRPC connections to chunkservers by address.
type chunkServerConns struct {
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newChunkServerConns() *chunkServerConns {
	return &chunkServerConns{conns: map[string]*grpc.ClientConn{}}
}

func (c *chunkServerConns) get(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc, ok := c.conns[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial chunkserver %s: %w", addr, err)
	}
	c.conns[addr] = cc
	return cc, nil
}

func (c *chunkServerConns) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for a, cc := range c.conns {
		_ = cc.Close()
		delete(c.conns, a)
	}
}
