package chunkserver_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

// mdsCut cuts one chunkserver off from the MDS on demand, in either
// direction, while its clients and peers still reach it.
type mdsCut struct {
	heartbeats atomic.Bool  // drop its heartbeats to the MDS
	hold       atomic.Int64 // hold each heartbeat answer this long (ns) before acting on it
	pushes     atomic.Bool  // refuse UpdateEpoch (only the MDS sends it)
	answered   atomic.Int64 // heartbeat answers handed to the chunkserver
}

func (m *mdsCut) knobs() chunkserver.TestingKnobs {
	return chunkserver.TestingKnobs{
		InterceptHeartbeat: func(ctx context.Context, call func(context.Context) (*mdspb.HeartbeatResponse, error)) (*mdspb.HeartbeatResponse, error) {
			if m.heartbeats.Load() {
				return nil, status.Error(codes.Unavailable, "test: heartbeats to the MDS are cut")
			}
			resp, err := call(ctx)
			if d := time.Duration(m.hold.Load()); d > 0 && err == nil {
				select {
				case <-time.After(d):
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			if err == nil {
				m.answered.Add(1)
			}
			return resp, err
		},
		UnaryInterceptor: func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			if m.pushes.Load() && info.FullMethod == chunkpb.ChunkService_UpdateEpoch_FullMethodName {
				return nil, status.Error(codes.Unavailable, "test: the MDS cannot reach this chunkserver")
			}
			return handler(ctx, req)
		},
	}
}

// startCutCluster starts a cluster whose MDS grants epoch leases of lease
// and whose chunkservers can each be cut off from the MDS.
func startCutCluster(t *testing.T, lease time.Duration) (*cluster.Cluster, []*mdsCut) {
	t.Helper()
	cuts := []*mdsCut{{}, {}, {}}
	c := cluster.Start(t, cluster.Options{EpochLease: lease, Tune: func(i int, cfg *chunkserver.Config) {
		faults := cfg.TestingKnobs.Faults
		cfg.TestingKnobs = cuts[i].knobs()
		cfg.TestingKnobs.Faults = faults
	}})
	return c, cuts
}

// leaderOf returns the index of the chunkserver that leads a copyset.
func leaderOf(t *testing.T, c *cluster.Cluster, ref *commonpb.CopysetRef) int {
	t.Helper()
	id := copyset.MakeGroupID(ref.GetLogicalPoolId(), ref.GetCopysetId())
	leader := -1
	soon.Succeeds(t, 30*time.Second, func() error {
		for i := range 3 {
			if s := c.ChunkServer(i); s != nil {
				if cs, err := s.Engine().Get(id); err == nil && cs.IsLeader() {
					leader = i
					return nil
				}
			}
		}
		return fmt.Errorf("copyset %s has no leader", id)
	})
	return leader
}

func longCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// rawWrite sends one write to one chunkserver, without retries.
func rawWrite(ctx context.Context, cl chunkpb.ChunkServiceClient, ch *mdspb.ChunkRef, volume, epoch uint64, data []byte) (chunkpb.Status, string) {
	r, err := cl.WriteChunk(ctx, &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: volume, Epoch: epoch, Data: data})
	if err != nil {
		return chunkpb.Status_STATUS_INTERNAL_ERROR, "gRPC: " + err.Error()
	}
	return r.GetStatus(), r.GetMessage()
}

func isLeaseRefusal(st chunkpb.Status, msg string, id uint64) bool {
	return st == chunkpb.Status_STATUS_UNAVAILABLE && strings.Contains(msg, fmt.Sprintf("chunkserver %d holds no epoch lease", id))
}

func TestChunkServerCutOffFromTheMDSStopsWritingWhenItsLeaseRunsOut(t *testing.T) {
	c, cuts := startCutCluster(t, time.Second)
	v := openVolume(t, c, "lease")
	ctx := longCtx(t)
	ch := v.chunks[0]
	x := leaderOf(t, c, ch.GetCopyset())
	xs := c.ChunkServer(x)
	cl := c.ChunkClient().Client(xs.Addr())
	write := func(tag string) (chunkpb.Status, string) {
		return rawWrite(ctx, cl, ch, v.id, v.epoch, pattern(tag, 4096))
	}
	last := "before|"
	soon.Succeeds(t, 10*time.Second, func() error {
		if st, msg := write(last); st != chunkpb.Status_STATUS_OK {
			return fmt.Errorf("write before the cut: %v %s", st, msg)
		}
		return nil
	})

	cuts[x].heartbeats.Store(true)
	n := 0
	soon.Succeeds(t, 20*time.Second, func() error {
		n++
		tag := fmt.Sprintf("cut-%d|", n)
		st, msg := write(tag)
		switch {
		case isLeaseRefusal(st, msg, xs.ID()):
			if !strings.Contains(msg, "ago") {
				return fmt.Errorf("refusal does not say how long since the last sync: %s", msg)
			}
			return nil
		case st == chunkpb.Status_STATUS_OK:
			last = tag
			return fmt.Errorf("chunkserver %d still accepts writes with its heartbeats cut", xs.ID())
		default:
			t.Fatalf("write with heartbeats cut: %v %s; want OK, then UNAVAILABLE once the lease runs out", st, msg)
			return nil
		}
	})
	// The refused write changed nothing.
	cc := c.ChunkClient()
	got, _, err := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, 0, 4096)
	if err != nil || !bytes.Equal(got, pattern(last, 4096)) {
		t.Fatalf("chunk after the refusal is not the last accepted write %q (%v)", last, err)
	}

	cuts[x].heartbeats.Store(false)
	soon.Succeeds(t, 30*time.Second, func() error {
		if st, msg := write("after|"); st != chunkpb.Status_STATUS_OK {
			return fmt.Errorf("write after heartbeats resumed: %v %s", st, msg)
		}
		return nil
	})
	got, _, err = cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, 0, 4096)
	if err != nil || !bytes.Equal(got, pattern("after|", 4096)) {
		t.Fatalf("write after heartbeats resumed did not land (%v)", err)
	}
}

func TestHeldHeartbeatAnswersDoNotLengthenTheEpochLease(t *testing.T) {
	const lease = time.Second
	c, cuts := startCutCluster(t, lease)
	v := openVolume(t, c, "held")
	ctx := longCtx(t)
	ch := v.chunks[0]
	x := leaderOf(t, c, ch.GetCopyset())
	xs := c.ChunkServer(x)
	cl := c.ChunkClient().Client(xs.Addr())
	write := func() (chunkpb.Status, string) {
		return rawWrite(ctx, cl, ch, v.id, v.epoch, pattern("held|", 4096))
	}
	// Every answer reaches the chunkserver a lease after its heartbeat left:
	// the lease it grants has run out when it arrives.
	cuts[x].hold.Store(int64(2 * lease))
	soon.Succeeds(t, 20*time.Second, func() error {
		if st, msg := write(); !isLeaseRefusal(st, msg, xs.ID()) {
			return fmt.Errorf("write: %v %s; want the lease refusal", st, msg)
		}
		return nil
	})
	n0 := cuts[x].answered.Load()
	deadline := time.Now().Add(30 * time.Second)
	for cuts[x].answered.Load() < n0+3 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d held heartbeat answers in 30s", cuts[x].answered.Load()-n0)
		}
		if st, msg := write(); !isLeaseRefusal(st, msg, xs.ID()) {
			t.Fatalf("write after %d late heartbeat answers: %v %s; a late answer must not renew the lease", cuts[x].answered.Load()-n0, st, msg)
		}
		time.Sleep(20 * time.Millisecond) // pace the probes
	}
	cuts[x].hold.Store(0)
	soon.Succeeds(t, 30*time.Second, func() error {
		if st, msg := write(); st != chunkpb.Status_STATUS_OK {
			return fmt.Errorf("write with prompt answers again: %v %s", st, msg)
		}
		return nil
	})
}

// w1Attempt is one write of the old writer.
type w1Attempt struct {
	tag  string
	sent time.Time
	st   chunkpb.Status
	msg  string
}

func TestNewWriterFencesOldWriterOnAChunkServerCutOffFromTheMDS(t *testing.T) {
	const lease = time.Second
	c, cuts := startCutCluster(t, lease)
	w1 := openVolume(t, c, "fence") // the old writer's open
	ctx := longCtx(t)
	ch := w1.chunks[0]
	x := leaderOf(t, c, ch.GetCopyset())
	xs := c.ChunkServer(x)
	cl := c.ChunkClient().Client(xs.Addr())
	cc := c.ChunkClient()
	soon.Succeeds(t, 10*time.Second, func() error {
		if st, msg := rawWrite(ctx, cl, ch, w1.id, w1.epoch, pattern("w1-start|", 4096)); st != chunkpb.Status_STATUS_OK {
			return fmt.Errorf("first write of the old writer: %v %s", st, msg)
		}
		return nil
	})

	// X loses the MDS both ways; the old writer still reaches it and keeps
	// writing the same block.
	cuts[x].heartbeats.Store(true)
	cuts[x].pushes.Store(true)
	var (
		mu       sync.Mutex
		attempts []w1Attempt
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 10000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			a := w1Attempt{tag: fmt.Sprintf("w1-%d|", i), sent: time.Now()}
			a.st, a.msg = rawWrite(ctx, cl, ch, w1.id, w1.epoch, pattern(a.tag, 4096))
			mu.Lock()
			attempts = append(attempts, a)
			mu.Unlock()
			time.Sleep(5 * time.Millisecond) // pace the writes
		}
	}()

	// The new writer opens the volume.
	openStart := time.Now()
	o, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "fence", Writable: true, Client: "w2"})
	if err != nil {
		t.Fatalf("open of the new writer: %v", err)
	}
	returned := time.Now()
	w2 := o.GetVolume().GetEpoch()
	if w2 <= w1.epoch {
		t.Fatalf("new writer got epoch %d, old one %d", w2, w1.epoch)
	}
	if waited := returned.Sub(openStart); waited < lease {
		t.Fatalf("open returned after %s with chunkserver %d unreachable, before its %s epoch lease could run out", waited, xs.ID(), lease)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		after := 0
		for _, a := range attempts {
			if a.sent.After(returned) {
				after++
			}
		}
		if after < 20 {
			return fmt.Errorf("%d writes of the old writer after the open", after)
		}
		return nil
	})
	close(stop)
	<-done

	// No write of the old writer sent after the open returned was accepted,
	// and the block holds the last write it had accepted before.
	last := "w1-start|"
	counts := map[string]int{}
	for _, a := range attempts {
		when := "before"
		if a.sent.After(returned) {
			when = "after"
		}
		counts[when+" "+a.st.String()]++
	}
	t.Logf("open waited %s; old writer's writes by when they were sent relative to its return: %v", returned.Sub(openStart), counts)
	for _, a := range attempts {
		if a.st == chunkpb.Status_STATUS_OK {
			if a.sent.After(returned) {
				t.Fatalf("chunkserver %d accepted old writer's %q sent %s after the new writer's open returned", xs.ID(), a.tag, a.sent.Sub(returned))
			}
			last = a.tag
			continue
		}
		if !isLeaseRefusal(a.st, a.msg, xs.ID()) && a.st != chunkpb.Status_STATUS_EPOCH_TOO_OLD {
			t.Fatalf("old writer's %q: %v %s; want OK, the lease refusal or EPOCH_TOO_OLD", a.tag, a.st, a.msg)
		}
	}
	got, _, err := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), w1.id, 0, 4096)
	if err != nil || !bytes.Equal(got, pattern(last, 4096)) {
		t.Fatalf("block is not the old writer's last accepted write %q (%v)", last, err)
	}

	// Chunkservers the push reached refuse the old writer and serve the new.
	reachable := false
	for _, other := range w1.chunks {
		if leaderOf(t, c, other.GetCopyset()) == x {
			continue
		}
		if st, err := cc.Write(ctx, other.GetCopyset(), other.GetChunkId(), w1.id, w1.epoch, 0, pattern("w1-late|", 4096)); err != nil || st != chunkpb.Status_STATUS_EPOCH_TOO_OLD {
			t.Fatalf("old writer on a reachable chunkserver: %v %v, want EPOCH_TOO_OLD", st, err)
		}
		if st, err := cc.Write(ctx, other.GetCopyset(), other.GetChunkId(), w1.id, w2, 0, pattern("w2|", 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("new writer on a reachable chunkserver: %v %v", st, err)
		}
		reachable = true
		break
	}
	if !reachable {
		t.Logf("chunkserver %d leads every copyset of the segment: no reachable leader to check", xs.ID())
	}
	// The cut-off chunkserver serves nobody until it syncs with the MDS.
	if st, msg := rawWrite(ctx, cl, ch, w1.id, w2, pattern("w2|", 4096)); !isLeaseRefusal(st, msg, xs.ID()) {
		t.Fatalf("new writer on the cut-off chunkserver: %v %s; want the lease refusal", st, msg)
	}
	cuts[x].heartbeats.Store(false)
	cuts[x].pushes.Store(false)
	soon.Succeeds(t, 30*time.Second, func() error {
		if st, msg := rawWrite(ctx, cl, ch, w1.id, w2, pattern("w2|", 4096)); st != chunkpb.Status_STATUS_OK {
			return fmt.Errorf("new writer once the chunkserver is back: %v %s", st, msg)
		}
		return nil
	})
	if st, msg := rawWrite(ctx, cl, ch, w1.id, w1.epoch, pattern("w1-back|", 4096)); st != chunkpb.Status_STATUS_EPOCH_TOO_OLD {
		t.Fatalf("old writer once the chunkserver is back: %v %s, want EPOCH_TOO_OLD", st, msg)
	}
	got, _, err = cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), w1.id, 0, 4096)
	if err != nil || !bytes.Equal(got, pattern("w2|", 4096)) {
		t.Fatalf("block is not the new writer's (%v)", err)
	}
}
