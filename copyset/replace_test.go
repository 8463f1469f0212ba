package copyset

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// gatedStore holds Close, once its store is closed, until release is closed:
// it keeps Remove between taking a copyset out of the engine and moving its
// directory to the trash.
type gatedStore struct {
	ChunkStore
	closed  chan struct{}
	release chan struct{}
}

func (s *gatedStore) Close() error {
	err := s.ChunkStore.Close()
	close(s.closed)
	<-s.release
	return err
}

// TestCreateDuringRemoveGetsAFreshDirectory creates a replica of a copyset
// while its previous replica is being removed (the MDS placing the copyset
// here again, or an operator replacing a broken replica while a heartbeat
// removes it). The new replica must not adopt the old one's directory and
// chunk files: Remove moves that directory to the trash, and the new replica
// would be left with chunks whose files are gone.
func TestCreateDuringRemoveGetsAFreshDirectory(t *testing.T) {
	gate := &gatedStore{closed: make(chan struct{}), release: make(chan struct{})}
	gated := false
	tc := newTestCluster(t, 1, 8, func(c *Config) {
		open := c.OpenStore
		c.OpenStore = func(d string) (ChunkStore, error) {
			s, err := open(d)
			if err != nil || gated {
				return s, err
			}
			gated = true // the first store opened: the replica Remove removes
			gate.ChunkStore = s
			return gate, nil
		}
	})
	e := tc.node(1).engine
	id := MakeGroupID(5, 1)
	if err := e.Create(id, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	old, err := e.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for !old.IsLeader() {
		if ctx.Err() != nil {
			t.Fatal("the single replica never led")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := writeWait(ctx, old, 7, 1, 1, 0, make([]byte, testBlock)); err != nil {
		t.Fatal(err)
	}

	removed := make(chan error, 1)
	go func() { removed <- e.Remove(id) }()
	<-gate.closed // out of the engine, its directory not yet in the trash
	created := make(chan error, 1)
	go func() { created <- e.Create(id, nil) }()
	select {
	case err := <-created: // it did not wait for the removal
		created <- err
	case <-time.After(300 * time.Millisecond):
	}
	close(gate.release)
	if err := <-removed; err != nil {
		t.Fatalf("remove: %v", err)
	}
	if err := <-created; err != nil {
		t.Fatalf("create: %v", err)
	}

	c, err := e.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Store().List(); len(got) != 0 {
		t.Errorf("the new replica holds chunks %v of the removed one", got)
	}
	if _, err := os.Stat(filepath.Join(c.dir, metaFile)); err != nil {
		t.Errorf("the new replica's directory: %v", err)
	}
	if err := c.Store().WriteAt(9, make([]byte, testBlock), 0); err != nil {
		t.Errorf("write into the new replica's store: %v", err)
	}
}

// TestRemoveReplicaLeavesItsSuccessor: a removal meant for one replica (the
// broken one a heartbeat reported) does not remove the empty replica that
// took its place since.
func TestRemoveReplicaLeavesItsSuccessor(t *testing.T) {
	tc := newTestCluster(t, 1, 8, nil)
	e := tc.node(1).engine
	id := MakeGroupID(5, 2)
	if err := e.Create(id, []uint64{1}); err != nil {
		t.Fatal(err)
	}
	old, err := e.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Remove(id); err != nil {
		t.Fatal(err)
	}
	if err := e.Create(id, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.RemoveReplica(old); !errors.Is(err, ErrReplaced) {
		t.Fatalf("removing the old replica: %v, want ErrReplaced", err)
	}
	now, err := e.Get(id)
	if err != nil || now == old {
		t.Fatalf("the new replica is gone (%v) or is the old one", err)
	}
	if err := e.RemoveReplica(now); err != nil {
		t.Fatalf("removing the current replica: %v", err)
	}
	if _, err := e.Get(id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after removing the current replica: %v", err)
	}
}
