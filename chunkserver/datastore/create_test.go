package datastore

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"cairn.io/cairn/chunkfilepool"
)

// TestCreateDoesNotWaitForTheFormatter: with no formatted file ready and the
// formatter stuck, creating a chunk fails with ErrNoSpace (wrapping
// chunkfilepool.ErrPoolEmpty, which the copyset retries later) after at most
// CreateWait, instead of waiting for the formatter. Copysets apply writes on
// a few shared workers; a worker held here for the pool's full wait stalls
// every copyset of the chunkserver.
func TestCreateDoesNotWaitForTheFormatter(t *testing.T) {
	release := make(chan struct{})
	root := t.TempDir()
	pool, err := chunkfilepool.Open(chunkfilepool.Options{
		Dir: filepath.Join(root, "pool"), ChunkSize: testChunk, MetaPageSize: testMeta, BlockSize: testBlock,
		InitialChunks: 1, MaxChunks: 8, LowWater: 1, GrowBy: 1, GetTimeout: time.Hour,
		TestingKnobs: chunkfilepool.TestingKnobs{BeforeWrite: func(string, int64) error {
			<-release
			return nil
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(release)
		_ = pool.Close()
	})
	s, err := Open(filepath.Join(root, "copysets", "1-1"), pool, Options{CreateWait: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	done := make(chan error, 1)
	go func() { done <- s.WriteAt(1, make([]byte, testBlock), 0) }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNoSpace) || !errors.Is(err, chunkfilepool.ErrPoolEmpty) {
			t.Fatalf("create with the formatter stuck: %v, want ErrNoSpace wrapping chunkfilepool.ErrPoolEmpty", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("creating a chunk waited for a formatter that makes no progress")
	}
}
