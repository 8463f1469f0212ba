package client_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

// TestSnapshotUnderWrites takes a snapshot while one writer writes
// numbered blocks one after another, spread over several chunks. The
// writer goes on through the snapshot without an error (it takes the new
// epoch and sequence number), and the snapshot reads exactly the volume
// after some write k, where k is at least the last write acknowledged
// before the snapshot was asked for and before the first write started
// after it returned: crash-consistent. The volume itself reads the last
// writes. Deleting the snapshot makes it unreadable and gives its space
// back.
func TestSnapshotUnderWrites(t *testing.T) {
	c := cluster.Start(t, cluster.Options{SessionLease: 2 * time.Second})
	createVolume(t, c, "snapvol", seg)
	w := open(t, c, "snapvol", client.Options{})
	const blocks = 64 // 64 KiB apart: 16 blocks per 1 MiB chunk, 4 chunks
	block := func(k int) []byte {
		b := bytes.Repeat([]byte{byte(k)}, 4096)
		binary.BigEndian.PutUint64(b, uint64(k+1))
		return b
	}
	blockOff := func(i int) int64 { return int64(i) * 64 << 10 }

	var (
		mu      sync.Mutex
		acked   = -1 // last acknowledged write
		started = -1 // last write started
	)
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for k := 0; ; k++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			mu.Lock()
			started = k
			mu.Unlock()
			if _, err := w.WriteAt(ctx, block(k), blockOff(k%blocks)); err != nil {
				done <- fmt.Errorf("write %d: %w", k, err)
				return
			}
			mu.Lock()
			acked = k
			mu.Unlock()
		}
	}()
	progress := func(n int) {
		soon.Succeeds(t, 30*time.Second, func() error {
			mu.Lock()
			defer mu.Unlock()
			if acked < n {
				return fmt.Errorf("%d writes acknowledged", acked+1)
			}
			return nil
		})
	}
	progress(3 * blocks)
	mu.Lock()
	before := acked
	mu.Unlock()
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "snapvol", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	after := started + 1 // no write from here on may be in the snapshot
	mu.Unlock()
	progress(after + 2*blocks)
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("the writer failed across the snapshot: %v", err)
	}

	s := open(t, c, "snapvol", client.Options{Snapshot: "s1"})
	img := make([]byte, blockOff(blocks))
	if _, err := s.ReadAt(ctx, img, 0); err != nil {
		t.Fatal(err)
	}
	// The image after write k: block i holds the last write j <= k with
	// j % blocks == i.
	matches := func(k int) bool {
		for i := range blocks {
			j := k - ((k-i)%blocks+blocks)%blocks
			got := img[blockOff(i) : blockOff(i)+4096]
			if j < 0 && !bytes.Equal(got, make([]byte, 4096)) || j >= 0 && !bytes.Equal(got, block(j)) {
				return false
			}
		}
		return true
	}
	found := -1
	for k := before; k < after; k++ {
		if matches(k) {
			found = k
			break
		}
	}
	if found < 0 {
		t.Fatalf("the snapshot is not the volume after any write from %d (acknowledged before it was asked) to %d (started after it returned)", before, after-1)
	}
	t.Logf("snapshot holds the volume after write %d (acknowledged before: %d, started after: %d)", found, before, after)

	// The volume reads its own last writes.
	mu.Lock()
	last := acked
	mu.Unlock()
	cur := make([]byte, 4096)
	for i := range blocks {
		j := last - ((last-i)%blocks+blocks)%blocks
		if _, err := w.ReadAt(ctx, cur, blockOff(i)); err != nil || !bytes.Equal(cur, block(j)) {
			t.Fatalf("volume block %d: %v, want write %d", i, err, j)
		}
	}
	// A snapshot handle cannot write; asking for the newest snapshot again
	// is answered with it (a retry); a name taken by an older one is
	// refused; deleting a volume with snapshots is refused.
	if _, err := s.WriteAt(ctx, cur, 0); !errors.Is(err, client.ErrReadOnly) {
		t.Fatalf("write through a snapshot handle: %v", err)
	}
	list, err := c.Conn.Volumes().ListSnapshots(ctx, &mdspb.ListSnapshotsRequest{Volume: "snapvol"})
	if err != nil || len(list.Snapshots) != 1 {
		t.Fatalf("list snapshots: %v %v", list, err)
	}
	again, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "snapvol", Name: "s1"})
	if err != nil || again.Snapshot.Seq != list.Snapshots[0].Seq {
		t.Fatalf("snapshot s1 asked for again: %v %v, want sequence number %d", again, err, list.Snapshots[0].Seq)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "snapvol", Name: "s2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "snapvol", Name: "s1"}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("snapshot s1 asked for after s2: %v, want AlreadyExists", err)
	}
	if _, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "snapvol", Name: "s2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().DeleteVolume(ctx, &mdspb.DeleteVolumeRequest{Name: "snapvol"}); err == nil {
		t.Fatal("a volume with a snapshot was deleted")
	}

	// Deleting the snapshot: unreadable at once, its kept versions go.
	if _, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "snapvol", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "snapvol", client.Options{Snapshot: "s1", Logger: cluster.Logger()}); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("open a deleted snapshot: %v", err)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := c.Conn.Volumes().ListSnapshots(ctx, &mdspb.ListSnapshotsRequest{Volume: "snapvol"})
		if err != nil {
			return err
		}
		if len(resp.Snapshots) != 0 {
			return fmt.Errorf("snapshots %v", resp.Snapshots)
		}
		kept := 0
		for _, srv := range c.ChunkServers() {
			for _, cs := range srv.Engine().List() {
				for _, id := range cs.Store().List() {
					_ = cs.Store().EachKept(id, func(uint64, uint64, int64, []byte, []byte) { kept++ })
				}
			}
		}
		if kept != 0 {
			return fmt.Errorf("%d versions still kept", kept)
		}
		return nil
	})
}

// keptVersions counts the versions the cluster's chunk stores keep.
func keptVersions(c *cluster.Cluster) int {
	kept := 0
	for _, srv := range c.ChunkServers() {
		for _, cs := range srv.Engine().List() {
			for _, id := range cs.Store().List() {
				_ = cs.Store().EachKept(id, func(uint64, uint64, int64, []byte, []byte) { kept++ })
			}
		}
	}
	return kept
}

// TestSnapshotLifecycle: unmapping whole chunks after a snapshot keeps
// what the snapshot reads; a handle on a snapshot that was deleted and
// taken again under the same name fails instead of reading the new one;
// a writer that goes on through a deletion stops keeping data for it, so
// nothing is left kept once the deletion is done.
func TestSnapshotLifecycle(t *testing.T) {
	c := cluster.Start(t, cluster.Options{SessionLease: 2 * time.Second})
	createVolume(t, c, "life", seg)
	w := open(t, c, "life", client.Options{})
	a := bytes.Repeat([]byte("A"), 2<<20) // chunks 0 and 1 (1 MiB chunks)
	if _, err := w.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "life", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	// The writer has not heard of the snapshot yet when it unmaps.
	if err := w.UnmapAt(ctx, 0, 2<<20); err != nil {
		t.Fatal(err)
	}
	s := open(t, c, "life", client.Options{Snapshot: "s1"})
	got := make([]byte, 2<<20)
	if _, err := s.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("snapshot after the volume was unmapped: %v (equal %v)", err, bytes.Equal(got, a))
	}
	if _, err := w.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, make([]byte, 2<<20)) {
		t.Fatalf("volume after unmap: %v", err)
	}

	// Deleted and taken again under the same name, while the writer goes on.
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for k := 0; ; k++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if _, err := w.WriteAt(ctx, bytes.Repeat([]byte{byte(k)}, 4096), int64(k%512)*4096); err != nil {
				done <- err
				return
			}
		}
	}()
	if _, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "life", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "life", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if _, err := s.ReadAt(ctx, got[:4096], 0); !errors.Is(err, client.ErrNotFound) {
			return fmt.Errorf("read through the handle of the deleted s1: %v, want ErrNotFound", err)
		}
		return nil
	})
	if _, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "life", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := c.Conn.Volumes().ListSnapshots(ctx, &mdspb.ListSnapshotsRequest{Volume: "life"})
		if err != nil || len(resp.Snapshots) != 0 {
			return fmt.Errorf("snapshots %v %v", resp.GetSnapshots(), err)
		}
		return nil
	})
	time.Sleep(500 * time.Millisecond) // writes go on after the deletion
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("the writer failed across the deletions: %v", err)
	}
	if n := keptVersions(c); n != 0 {
		t.Fatalf("%d versions kept with no snapshot left (the writer kept data for a deleted snapshot)", n)
	}
}

// TestSnapshotsThroughMDSFailover: snapshots taken before an MDS failover
// read the same after it, the writer goes on through it, a snapshot is
// taken after it, and a deletion begun before a failover finishes after
// it without touching what the other snapshot reads.
func TestSnapshotsThroughMDSFailover(t *testing.T) {
	c := cluster.Start(t, cluster.Options{SessionLease: 2 * time.Second})
	createVolume(t, c, "fo", seg)
	w := open(t, c, "fo", client.Options{})
	a := bytes.Repeat([]byte("a"), 3<<20)
	if _, err := w.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "fo", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	c.RestartMDS()
	b := bytes.Repeat([]byte("b"), 1<<20)
	if _, err := w.WriteAt(ctx, b, 1<<20); err != nil {
		t.Fatalf("write after the MDS failover: %v", err)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "fo", Name: "s2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(ctx, bytes.Repeat([]byte("c"), 3<<20), 0); err != nil {
		t.Fatal(err)
	}
	ab := append(append(append([]byte(nil), a[:1<<20]...), b...), a[2<<20:]...)
	read := func(name string) []byte {
		t.Helper()
		s := open(t, c, "fo", client.Options{Snapshot: name})
		got := make([]byte, 3<<20)
		if _, err := s.ReadAt(ctx, got, 0); err != nil {
			t.Fatal(err)
		}
		return got
	}
	if !bytes.Equal(read("s1"), a) || !bytes.Equal(read("s2"), ab) {
		t.Fatal("a snapshot does not read what the volume held when it was taken")
	}
	// A snapshot handle that cannot ask the MDS for a session lease stops
	// reading (a deleted snapshot's data goes a lease after its deletion).
	h := open(t, c, "fo", client.Options{Snapshot: "s1"})
	if _, err := h.ReadAt(ctx, make([]byte, 4096), 0); err != nil { // its segment is known from here on
		t.Fatal(err)
	}
	c.StopMDS()
	soon.Succeeds(t, 15*time.Second, func() error {
		if _, err := h.ReadAt(ctx, make([]byte, 4096), 0); !errors.Is(err, client.ErrUnavailable) {
			return fmt.Errorf("read through a snapshot handle without the MDS: %v, want ErrUnavailable", err)
		}
		return nil
	})
	c.StartMDS()
	soon.Succeeds(t, 15*time.Second, func() error {
		_, err := h.ReadAt(ctx, make([]byte, 4096), 0)
		return err
	})
	if _, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "fo", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	c.RestartMDS()
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := c.Conn.Volumes().ListSnapshots(ctx, &mdspb.ListSnapshotsRequest{Volume: "fo"})
		if err != nil || len(resp.Snapshots) != 1 {
			return fmt.Errorf("snapshots %v %v", resp.GetSnapshots(), err)
		}
		return nil
	})
	if !bytes.Equal(read("s2"), ab) {
		t.Fatal("snapshot s2 changed when s1 was deleted")
	}
}

// TestSnapshotDoesNotUnfence: a writer fenced by a later writable open
// stays fenced when a snapshot then raises the epoch (the snapshot leaves
// the current writer in place, not an earlier one).
func TestSnapshotDoesNotUnfence(t *testing.T) {
	c := cluster.Start(t, cluster.Options{SessionLease: 2 * time.Second})
	createVolume(t, c, "unf", seg)
	a := open(t, c, "unf", client.Options{ClientName: "a"})
	if _, err := a.WriteAt(ctx, bytes.Repeat([]byte("a"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	b := open(t, c, "unf", client.Options{ClientName: "b"})
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "unf", Name: "s"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.WriteAt(ctx, bytes.Repeat([]byte("x"), 4096), 0); !errors.Is(err, client.ErrFenced) {
		t.Fatalf("write of the fenced writer after a snapshot: %v, want ErrFenced", err)
	}
	if _, err := b.WriteAt(ctx, bytes.Repeat([]byte("b"), 4096), 0); err != nil {
		t.Fatalf("write of the current writer after a snapshot: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte("b"), 4096)) {
		t.Fatalf("read back: %v", err)
	}
}
