package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

const seg = 64 << 20 // test cluster segment size (1 MiB chunks)

// ctx is the context of the tests' IO calls.
var ctx = context.Background()

func createVolume(t *testing.T, c *cluster.Cluster, name string, size uint64) {
	t.Helper()
	if _, err := c.Conn.Volumes().CreateVolume(context.Background(), &mdspb.CreateVolumeRequest{Name: name, Size: size}); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
}

func open(t *testing.T, c *cluster.Cluster, name string, o client.Options) *client.Volume {
	t.Helper()
	if o.Logger == nil {
		o.Logger = cluster.Logger()
	}
	if o.RetryTimeout == 0 {
		o.RetryTimeout = 30 * time.Second
	}
	v, err := client.OpenWithOptions(context.Background(), []string{c.MDS.Addr()}, name, o)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// TestRandomIOMatchesModel writes and reads random ranges, many crossing
// chunk and segment bounds, and compares every read with an in-memory copy.
func TestRandomIOMatchesModel(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	const size = 3 * seg
	createVolume(t, c, "rand", size)
	v := open(t, c, "rand", client.Options{})
	if v.Size() != size {
		t.Fatalf("size %d, want %d", v.Size(), size)
	}
	model := make([]byte, size)
	rng := rand.New(rand.NewSource(1))
	// Hot spots around chunk and segment bounds make splits likely.
	spots := []int64{0, 1 << 20, seg - 4096, seg, 2*seg - (1 << 20), 2 * seg, size - (3 << 20)}
	for i := 0; i < 120; i++ {
		base := spots[rng.Intn(len(spots))]
		off := base + int64(rng.Intn(512))*512 - 128*512
		off = max(0, min(off, size-512))
		n := int64(rng.Intn(3<<20)/512+1) * 512
		n = min(n, size-off)
		if rng.Intn(3) > 0 {
			b := randBytes(rng, int(n))
			if _, err := v.WriteAt(ctx, b, off); err != nil {
				t.Fatalf("write %d+%d: %v", off, n, err)
			}
			copy(model[off:], b)
		} else {
			got := make([]byte, n)
			if _, err := v.ReadAt(ctx, got, off); err != nil {
				t.Fatalf("read %d+%d: %v", off, n, err)
			}
			if !bytes.Equal(got, model[off:off+n]) {
				t.Fatalf("read %d+%d differs from what was written", off, n)
			}
		}
	}
	// Whole volume, via a second handle (read-only: it fences no one).
	r := open(t, c, "rand", client.Options{ReadOnly: true})
	got := make([]byte, size)
	for off := int64(0); off < size; off += 8 << 20 {
		if _, err := r.ReadAt(ctx, got[off:off+8<<20], off); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, model) {
		t.Fatal("full read differs from the model")
	}
	st := v.Stats()
	if st.SegmentsAllocated == 0 || st.SegmentsAllocated > 3 || st.ChunkRequests == 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestConcurrentWritersOfDisjointRanges(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "conc", 2*seg)
	v := open(t, c, "conc", client.Options{})
	const workers, each = 16, 40
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				off := int64(w*each+i) * 128 << 10
				if _, err := v.WriteAt(ctx, bytes.Repeat([]byte{byte(w), byte(i)}, 64<<10), off); err != nil {
					errs <- err
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	buf := make([]byte, 128<<10)
	for w := 0; w < workers; w++ {
		for i := 0; i < each; i++ {
			off := int64(w*each+i) * 128 << 10
			if _, err := v.ReadAt(ctx, buf, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, bytes.Repeat([]byte{byte(w), byte(i)}, 64<<10)) {
				t.Fatalf("block of writer %d #%d differs", w, i)
			}
		}
	}
}

func TestFencing(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "fence", seg)
	a := open(t, c, "fence", client.Options{ClientName: "a"})
	if _, err := a.WriteAt(ctx, bytes.Repeat([]byte("a"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	b := open(t, c, "fence", client.Options{ClientName: "b"})
	if b.Epoch() <= a.Epoch() {
		t.Fatalf("second opener got epoch %d, first %d", b.Epoch(), a.Epoch())
	}
	_, err := a.WriteAt(ctx, bytes.Repeat([]byte("x"), 4096), 0)
	if !errors.Is(err, client.ErrFenced) {
		t.Fatalf("write of the fenced client: %v, want ErrFenced", err)
	}
	// Fenced stays fenced, without asking anyone.
	if _, err := a.WriteAt(ctx, make([]byte, 512), 8192); !errors.Is(err, client.ErrFenced) {
		t.Fatalf("second write of the fenced client: %v", err)
	}
	if err := a.Flush(ctx); !errors.Is(err, client.ErrFenced) {
		t.Fatalf("flush of the fenced client: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte("a"), 4096)) {
		t.Fatalf("the fenced write changed data (%v)", err)
	}
	if _, err := b.WriteAt(ctx, bytes.Repeat([]byte("b"), 4096), 0); err != nil {
		t.Fatal(err)
	}
}

func TestUnmapReadsZerosAndFreesChunks(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "unmap", seg)
	v := open(t, c, "unmap", client.Options{})
	data := bytes.Repeat([]byte("d"), 4<<20)
	if _, err := v.WriteAt(ctx, data, 0); err != nil {
		t.Fatal(err)
	}
	chunksHeld := func() int {
		n := 0
		for _, s := range c.ChunkServers() {
			for _, cs := range s.Engine().List() {
				n += len(cs.Store().List())
			}
		}
		return n
	}
	// A write returns once a quorum has it; the third replica follows.
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := chunksHeld(); n != 12 {
			return fmt.Errorf("%d chunk replicas after writing 4 chunks, want 12", n)
		}
		return nil
	})
	// Whole chunks 1 and 2, plus a partial range in chunk 0 and chunk 3.
	if err := v.UnmapAt(ctx, 1<<20-4096, 2<<20+8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4<<20)
	if _, err := v.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := append([]byte{}, data...)
	clear(want[1<<20-4096 : 3<<20+4096])
	if !bytes.Equal(got, want) {
		t.Fatal("unmapped range does not read as zeros, or the rest changed")
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := chunksHeld(); n != 6 {
			return fmt.Errorf("%d chunk replicas after unmapping two whole chunks, want 6", n)
		}
		return nil
	})
	// Unmapping a never-written region is free and fine.
	if err := v.UnmapAt(ctx, 32<<20, 8<<20); err != nil {
		t.Fatal(err)
	}
}

func TestBadIOChangesNothing(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "bad", seg)
	v := open(t, c, "bad", client.Options{})
	if _, err := v.WriteAt(ctx, make([]byte, 4096), seg-2048); !errors.Is(err, client.ErrOutOfRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if _, err := v.ReadAt(ctx, make([]byte, 512), seg); !errors.Is(err, client.ErrOutOfRange) {
		t.Fatalf("read at the end: %v", err)
	}
	if _, err := v.WriteAt(ctx, make([]byte, 512), 100); !errors.Is(err, client.ErrUnaligned) {
		t.Fatalf("unaligned write: %v", err)
	}
	if _, err := v.WriteAt(ctx, make([]byte, 700), 0); !errors.Is(err, client.ErrUnaligned) {
		t.Fatalf("unaligned length: %v", err)
	}
	if v.Stats().SegmentsAllocated != 0 {
		t.Fatal("refused IO allocated a segment")
	}
	if _, err := client.OpenWithOptions(context.Background(), []string{c.MDS.Addr()}, "nope", client.Options{Logger: cluster.Logger()}); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("open of an unknown volume: %v", err)
	}
	v.Close()
	if _, err := v.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, client.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

func TestReadOnlyHandle(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "ro", seg)
	w := open(t, c, "ro", client.Options{})
	r := open(t, c, "ro", client.Options{ReadOnly: true})
	if _, err := r.WriteAt(ctx, make([]byte, 512), 0); !errors.Is(err, client.ErrReadOnly) {
		t.Fatalf("write through a read-only handle: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := r.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("read of a never-written volume: %v", err)
	}
	if _, err := w.WriteAt(ctx, bytes.Repeat([]byte("w"), 4096), 0); err != nil {
		t.Fatalf("the read-only opener fenced the writer: %v", err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if _, err := r.ReadAt(ctx, got, 0); err != nil {
			return err
		}
		if !bytes.Equal(got, bytes.Repeat([]byte("w"), 4096)) {
			return fmt.Errorf("read-only handle does not see the write yet")
		}
		return nil
	})
}

func TestExtendIsSeen(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "grow", seg)
	v := open(t, c, "grow", client.Options{})
	if _, err := c.Conn.Volumes().ExtendVolume(context.Background(), &mdspb.ExtendVolumeRequest{Name: "grow", NewSize: 2 * seg}); err != nil {
		t.Fatal(err)
	}
	if err := v.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	if v.Size() != 2*seg {
		t.Fatalf("size %d after extend, want %d", v.Size(), 2*seg)
	}
	if _, err := v.WriteAt(ctx, bytes.Repeat([]byte("e"), 4096), 2*seg-4096); err != nil {
		t.Fatalf("write into the new range: %v", err)
	}
}

// TestIOThroughLeaderChangesAndRestarts keeps writing and reading while
// leaders move and chunkservers restart: no IO may fail and every byte must
// read back.
func TestIOThroughLeaderChangesAndRestarts(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "churn", seg)
	// The product's default retry timeout: each restart costs a copyset an
	// election or two, and a loaded machine stretches a chunkserver's stop
	// (final checkpoints) and start to several seconds each.
	v := open(t, c, "churn", client.Options{RetryTimeout: time.Minute})
	const blocks = 256 // 64 KiB blocks over 16 MiB: 16 chunks
	model := make([][]byte, blocks)
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				b := rng.Intn(blocks/8)*8 + w // each writer owns its blocks
				data := bytes.Repeat([]byte(fmt.Sprintf("%d:%d|", w, i)), 64<<10)[:64<<10]
				if _, err := v.WriteAt(ctx, data, int64(b)*64<<10); err != nil {
					errs <- fmt.Errorf("writer %d: %w", w, err)
					return
				}
				mu.Lock()
				model[b] = data
				mu.Unlock()
			}
		}(w)
	}
	ctx := context.Background()
	// Move leaders around, then restart each chunkserver in turn.
	list, err := c.Conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, cs := range list.GetCopysets()[:4] {
		for _, p := range cs.GetPeers() {
			if p.GetChunkserverId() != cs.GetLeaderId() {
				c.Conn.Cluster().TransferLeader(ctx, &mdspb.TransferLeaderRequest{Copyset: cs.GetId(), ToChunkserverId: p.GetChunkserverId()})
				break
			}
		}
	}
	time.Sleep(time.Second)
	for i := 0; i < 3; i++ {
		c.StopChunkServer(i)
		time.Sleep(500 * time.Millisecond)
		c.StartChunkServer(i)
		time.Sleep(time.Second)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	for b, want := range model {
		if want == nil {
			want = make([]byte, 64<<10)
		}
		if _, err := v.ReadAt(ctx, buf, int64(b)*64<<10); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, want) {
			t.Fatalf("block %d differs after the churn", b)
		}
	}
	t.Logf("stats: %+v", v.Stats())
}

func TestIOGoesOnWithoutTheMDS(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "nomds", seg)
	v := open(t, c, "nomds", client.Options{RetryTimeout: 10 * time.Second})
	if _, err := v.WriteAt(ctx, bytes.Repeat([]byte("1"), 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	c.MDS.Stop()
	// The segment is allocated and its copysets known: IO needs no MDS.
	if _, err := v.WriteAt(ctx, bytes.Repeat([]byte("2"), 1<<20), 0); err != nil {
		t.Fatalf("write with the MDS down: %v", err)
	}
	got := make([]byte, 1<<20)
	if _, err := v.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte("2"), 1<<20)) {
		t.Fatalf("read with the MDS down: %v", err)
	}
}

// TestInflightBytesStayWithinBudget: many large concurrent reads and writes
// never have more bytes of chunk requests in flight than the volume's
// budget; the IOs wait for room rather than fail, and all complete.
func TestInflightBytesStayWithinBudget(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "budget", seg)
	const budget = 2 << 20
	var mu sync.Mutex
	var peak int64
	v := open(t, c, "budget", client.Options{
		MaxInflightBytes: budget,
		TestingKnobs: client.TestingKnobs{OnInflightBytes: func(n int64) {
			mu.Lock()
			peak = max(peak, n)
			mu.Unlock()
		}},
	})
	const workers, size = 8, 4 << 20
	var wg sync.WaitGroup
	errs := make(chan error, 2*workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data := bytes.Repeat([]byte{byte(w + 1)}, size)
			off := int64(w) * size
			if _, err := v.WriteAt(ctx, data, off); err != nil {
				errs <- err
				return
			}
			got := make([]byte, size)
			if _, err := v.ReadAt(ctx, got, off); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, data) {
				errs <- fmt.Errorf("worker %d read back other data", w)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if peak > budget || peak == 0 {
		t.Fatalf("peak bytes in flight %d, budget %d", peak, budget)
	}
	if n := v.Stats().InflightBytes; n != 0 {
		t.Fatalf("%d bytes still counted in flight", n)
	}
}

// TestCancelledIOStopsRetrying: with the copyset unable to elect a leader,
// a write retries; when its context ends it returns the context's error,
// not ErrTimeout after the retry timeout.
func TestCancelledIOStopsRetrying(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	createVolume(t, c, "cancel", seg)
	v := open(t, c, "cancel", client.Options{RetryTimeout: 10 * time.Minute})
	if _, err := v.WriteAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := v.WriteAt(cancelled, make([]byte, 4096), 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("write with a cancelled context: %v", err)
	}
	// Two of three replicas down: no quorum, the write retries.
	c.StopChunkServer(1)
	c.StopChunkServer(2)
	wctx, wcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := v.WriteAt(wctx, bytes.Repeat([]byte{7}, 4096), 0)
		done <- err
	}()
	soon.Succeeds(t, 30*time.Second, func() error {
		if v.Stats().Retries == 0 {
			return errors.New("no retry yet")
		}
		return nil
	})
	wcancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("retrying write after cancel: %v, want context.Canceled", err)
	}
}

// TestFencedSessionFencesTheHandle: when no chunkserver can confirm epochs
// (all cut off from the MDS, their epoch leases run out), a fenced writer's
// IO is answered UNAVAILABLE, never EPOCH_TOO_OLD. It must still learn that
// it is fenced, from the MDS refusing its session, and fail with ErrFenced
// instead of retrying until its deadline.
func TestFencedSessionFencesTheHandle(t *testing.T) {
	var cut atomic.Bool
	c := cluster.Start(t, cluster.Options{EpochLease: time.Second, Tune: func(i int, cfg *chunkserver.Config) {
		cfg.TestingKnobs = chunkserver.TestingKnobs{
			Faults:             cfg.TestingKnobs.Faults,
			InterceptHeartbeat: heartbeatsCut(&cut),
			UnaryInterceptor: func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
				if cut.Load() && info.FullMethod == chunkpb.ChunkService_UpdateEpoch_FullMethodName {
					return nil, status.Error(codes.Unavailable, "test: the MDS cannot reach this chunkserver")
				}
				return h(ctx, req)
			},
		}
	}})
	createVolume(t, c, "fence2", seg)
	a := open(t, c, "fence2", client.Options{ClientName: "a", RetryTimeout: 2 * time.Minute})
	if _, err := a.WriteAt(ctx, bytes.Repeat([]byte("a"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	cut.Store(true)
	b := open(t, c, "fence2", client.Options{ClientName: "b"})
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := a.WriteAt(wctx, bytes.Repeat([]byte("x"), 4096), 0); !errors.Is(err, client.ErrFenced) {
		t.Fatalf("write of the fenced client: %v, want ErrFenced", err)
	}
	cut.Store(false)
	got := make([]byte, 4096)
	if _, err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte("a"), 4096)) {
		t.Fatalf("the fenced write changed data (%v)", err)
	}
}
