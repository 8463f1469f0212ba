package client_test

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"strings"
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

// model is what a volume must read as.
type model struct {
	mu sync.Mutex
	b  []byte
}

func (m *model) write(p []byte, off int64) {
	m.mu.Lock()
	copy(m.b[off:], p)
	m.mu.Unlock()
}

func (m *model) snapshot() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.b)
}

// readAll reads a volume's first n bytes. A snapshot handle (a clone's
// source) refuses reads while the MDS has not confirmed it for a lease, as
// after an MDS restart: those are retried for a while.
func readAll(t *testing.T, v *client.Volume, n int64) []byte {
	t.Helper()
	got := make([]byte, n)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := v.ReadAt(ctx, got, 0)
		if err == nil {
			return got
		}
		if !errors.Is(err, client.ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("read %s: %v", v.Name(), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func mustEqual(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s differs first at byte %d (of %d)", what, i, len(want))
	}
}

// TestCloneLifecycle: write A, snapshot, write B; a clone of the snapshot
// reads A at once; writes C into the clone (whole pages, parts of pages,
// across chunks, unmaps) leave the snapshot reading A and the clone A+C;
// the snapshot and its volume cannot be deleted while the clone reads
// them; a client that does not read clones is refused; a snapshot of the
// clone before its flatten, and a clone of that snapshot (a clone of a
// clone), read through to the source; flatten under a writer and through
// an MDS failover and a chunkserver restart leaves every byte in place,
// the snapshot from before it included; once nothing reads the source any
// more it is released, the snapshot is deleted and the clone still reads
// A+C; a clone of the flattened clone's snapshot reads it.
func TestCloneLifecycle(t *testing.T) {
	// A short session lease (the source is released a lease after a
	// flatten), but not so short that the MDS restart below, on a loaded
	// machine, lets a writer's session expire: the epoch raise of a
	// release would then find it expired, and fence it.
	c := cluster.Start(t, cluster.Options{SessionLease: 10 * time.Second})
	const size = 4 << 20 // four 1 MiB chunks
	createVolume(t, c, "src", 2*seg)
	rng := rand.New(rand.NewSource(7))
	src := open(t, c, "src", client.Options{})
	a := randBytes(rng, size)
	if _, err := src.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	// In the source's second segment, which the clone never writes: its
	// writer caches that segment as never allocated, until a flatten by
	// another handle allocates it.
	a2 := randBytes(rng, 1<<20)
	if _, err := src.WriteAt(ctx, a2, seg+8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "src", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	b := randBytes(rng, 1<<20)
	if _, err := src.WriteAt(ctx, b, 1<<20); err != nil {
		t.Fatal(err)
	}

	// Bad clones change nothing.
	for _, bad := range []*mdspb.CreateVolumeRequest{
		{Name: "x", SourceVolume: "src", SourceSnapshot: "nope"},
		{Name: "x", SourceVolume: "nope", SourceSnapshot: "s1"},
		{Name: "x", SourceVolume: "src"},
		{Name: "src", SourceVolume: "src", SourceSnapshot: "s1"},
	} {
		if _, err := c.Conn.Volumes().CreateVolume(ctx, bad); err == nil {
			t.Fatalf("clone %v accepted", bad)
		}
	}
	resp, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "cl", Size: 3 * seg, SourceVolume: "src", SourceSnapshot: "s1"})
	if err != nil {
		t.Fatal(err)
	}
	if cs := resp.Volume.GetCloneSource(); cs.GetVolume() != "src" || cs.GetSnapshot() != "s1" || resp.Volume.Size != 3*seg {
		t.Fatalf("clone record: %v", resp.Volume)
	}
	// A retry answers with the clone.
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "cl", SourceVolume: "src", SourceSnapshot: "s1"}); err != nil {
		t.Fatalf("retried clone: %v", err)
	}
	// A client that does not read clones would read zeros: refused.
	if _, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "cl", Writable: true}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("open of a clone by a client without clones: %v", err)
	}

	cl := open(t, c, "cl", client.Options{})
	want := &model{b: make([]byte, 3*seg)}
	want.write(a, 0)
	want.write(a2, seg+8<<20)
	mustEqual(t, "the new clone", readAll(t, cl, 3*seg), want.snapshot())
	if name, flat := cl.Source(); name != "src@s1" || flat {
		t.Fatalf("Source() = %q, %v", name, flat)
	}
	// The chunks the source's snapshot has: a's four, a2's one.
	if got, _ := mapOf(t, cl, 3*seg); got != "[0,4) [72,73)" {
		t.Fatalf("map of the clone (MiB): %s, want data where the source has chunks", got)
	}

	// C: whole pages, parts of pages, across a chunk boundary, beyond the
	// source, unmaps of part of a chunk and of a whole one.
	writes := []struct {
		off int64
		n   int
	}{{0, 4096}, {8192 + 512, 512}, {(1 << 20) - 1024, 4096}, {3<<20 + 100*512, 3 * 512}, {2*seg + 4096, 8192}}
	for _, w := range writes {
		p := randBytes(rng, w.n)
		if _, err := cl.WriteAt(ctx, p, w.off); err != nil {
			t.Fatalf("write %d at %d: %v", w.n, w.off, err)
		}
		want.write(p, w.off)
	}
	if err := cl.UnmapAt(ctx, 2<<20, 1<<20); err != nil { // a whole chunk
		t.Fatal(err)
	}
	want.write(make([]byte, 1<<20), 2<<20)
	if err := cl.UnmapAt(ctx, 512, 1024); err != nil {
		t.Fatal(err)
	}
	want.write(make([]byte, 1024), 512)
	mustEqual(t, "the clone after its writes", readAll(t, cl, 3*seg), want.snapshot())
	snapH := open(t, c, "src", client.Options{Snapshot: "s1"})
	mustEqual(t, "the snapshot after the clone's writes", readAll(t, snapH, size), a)
	ab := bytes.Clone(a)
	copy(ab[1<<20:], b)
	mustEqual(t, "the source volume", readAll(t, src, size), ab)

	// What reads the snapshot keeps it.
	_, err = c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "src", Name: "s1"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "cl") {
		t.Fatalf("delete a snapshot with a clone: %v", err)
	}
	if _, err := c.Conn.Volumes().DeleteVolume(ctx, &mdspb.DeleteVolumeRequest{Name: "src", Force: true}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete the volume of a snapshot with a clone: %v", err)
	}
	if _, err := c.Conn.Volumes().RenameVolume(ctx, &mdspb.RenameVolumeRequest{Name: "src", NewName: "src2"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("rename the volume of a snapshot with a clone: %v", err)
	}

	// A snapshot of the clone before its flatten reads the source where
	// the clone owned nothing; a clone of that snapshot (a clone of a
	// clone) reads through both.
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "cl", Name: "t0"}); err != nil {
		t.Fatalf("snapshot of a clone not flattened: %v", err)
	}
	atT0 := want.snapshot()
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "cl3", SourceVolume: "cl", SourceSnapshot: "t0"}); err != nil {
		t.Fatal(err)
	}
	cl3 := open(t, c, "cl3", client.Options{})
	want3 := &model{b: bytes.Clone(atT0)}
	for _, w := range []struct {
		off int64
		n   int
	}{{7*4096 + 512, 512}, {3<<20 + 4096, 4096}} {
		p := randBytes(rng, w.n)
		if _, err := cl3.WriteAt(ctx, p, w.off); err != nil {
			t.Fatalf("write into the clone of the clone: %v", err)
		}
		want3.write(p, w.off)
	}
	mustEqual(t, "the clone of the unflattened clone", readAll(t, cl3, 3*seg), want3.snapshot())
	t0 := open(t, c, "cl", client.Options{Snapshot: "t0"})
	mustEqual(t, "the snapshot of the unflattened clone", readAll(t, t0, 3*seg), atT0)
	// cl3 is flattened first: what only src holds (a2, in a segment
	// neither cl nor cl3 ever allocated) comes down the chain.
	// Chunk 72 only src has; chunk 128 only cl.
	if got, _ := mapOf(t, cl3, 3*seg); got != "[0,4) [72,73) [128,129)" {
		t.Fatalf("map of the clone of the clone (MiB): %s", got)
	}
	copied3, err := open(t, c, "cl3", client.Options{ReadOnly: true}).Flatten(ctx, nil)
	if err != nil || copied3 < 1<<20 {
		t.Fatalf("flatten of the clone of the clone copied %d bytes: %v", copied3, err)
	}
	mustEqual(t, "the clone of the clone, flattened", readAll(t, open(t, c, "cl3", client.Options{ReadOnly: true}), 3*seg), want3.snapshot())

	// Flatten (from another handle, as cairn-ops does) under a writer,
	// through an MDS failover and a chunkserver restart.
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		wrng := rand.New(rand.NewSource(9))
		for k := 0; ; k++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			off := int64(wrng.Intn(size/512)) * 512
			n := min(512*(1+wrng.Intn(16)), size-int(off))
			p := randBytes(wrng, n)
			if _, err := cl.WriteAt(ctx, p, off); err != nil {
				done <- fmt.Errorf("write %d: %w", k, err)
				return
			}
			want.write(p, off)
		}
	}()
	flattener := open(t, c, "cl", client.Options{ReadOnly: true})
	var calls, last int64
	c.RestartMDS()
	c.StopChunkServer(1)
	c.StartChunkServer(1)
	copied, err := flattener.Flatten(ctx, func(done, total int64) {
		calls++
		if done < last || total != 2*seg {
			t.Errorf("progress %d of %d after %d", done, total, last)
		}
		last = done
	})
	if err != nil || copied < 1<<20 || copied > 6<<20 { // a2 at least: the clone never writes there
		t.Fatalf("flatten copied %d bytes: %v", copied, err)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if calls == 0 || last != 2*seg {
		t.Fatalf("progress called %d times, last %d", calls, last)
	}
	mustEqual(t, "the clone after flatten", readAll(t, cl, 3*seg), want.snapshot())
	mustEqual(t, "the clone's snapshot from before its flatten, after it", readAll(t, t0, 3*seg), atT0)
	mustEqual(t, "the clone of the clone, after the first one's flatten", readAll(t, cl3, 3*seg), want3.snapshot())
	// The flatten copied chunk 72 into the clone: its own now, and t0
	// (from before, when the clone had no chunk 72) finds it in the source.
	for _, h := range []*client.Volume{cl, t0} {
		if got, _ := mapOf(t, h, 3*seg); got != "[0,4) [72,73) [128,129)" {
			t.Fatalf("map of %s after the flatten (MiB): %s", h.Name(), got)
		}
	}

	// The source stays while t0 (from before the flatten) does; t0 goes
	// once cl3 (flattened) is released.
	soon.Succeeds(t, 30*time.Second, func() error {
		_, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "cl", Name: "t0"})
		return err
	})
	mustEqual(t, "the clone of the clone, released", readAll(t, cl3, 3*seg), want3.snapshot())

	// A session lease later the source is released: the snapshot goes.
	soon.Succeeds(t, 30*time.Second, func() error {
		_, err := c.Conn.Volumes().DeleteSnapshot(ctx, &mdspb.DeleteSnapshotRequest{Volume: "src", Name: "s1"})
		return err
	})
	soon.Succeeds(t, 30*time.Second, func() error {
		if name, _ := cl.Source(); name != "" {
			return fmt.Errorf("the clone's handle still reads %s", name)
		}
		return nil
	})
	mustEqual(t, "the released clone", readAll(t, cl, 3*seg), want.snapshot())
	fresh := open(t, c, "cl", client.Options{ReadOnly: true})
	mustEqual(t, "the released clone, from a new handle", readAll(t, fresh, 3*seg), want.snapshot())

	// A clone of the (flattened) clone.
	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "cl", Name: "t"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "cl2", SourceVolume: "cl", SourceSnapshot: "t"}); err != nil {
		t.Fatal(err)
	}
	cl2 := open(t, c, "cl2", client.Options{})
	want2 := &model{b: want.snapshot()}
	d := randBytes(rng, 3*512)
	if _, err := cl2.WriteAt(ctx, d, 5*4096+512); err != nil {
		t.Fatal(err)
	}
	want2.write(d, 5*4096+512)
	mustEqual(t, "the clone of the clone", readAll(t, cl2, 3*seg), want2.snapshot())
	if got, _ := mapOf(t, cl2, 3*seg); got != "[0,4) [72,73) [128,129)" {
		t.Fatalf("map of the clone of the flattened clone (MiB): %s", got)
	}
	mustEqual(t, "the first clone", readAll(t, cl, 3*seg), want.snapshot())
	if err := cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := fresh.Flatten(ctx, nil); !errors.Is(err, client.ErrNotClone) {
		t.Fatalf("flatten of a released clone: %v", err)
	}
}
