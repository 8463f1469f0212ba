package chunkserver_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/test/cluster"
)

// The schedulers with real chunkservers: replicas of a lost chunkserver
// are rebuilt on others in its zone, a retired chunkserver is drained, a
// new one receives copysets and leaderships, and writes acknowledged
// before and during the moves read back exactly.

// scheduleCluster starts two chunkservers in each of three zones with
// schedulers that act within seconds.
func scheduleCluster(t *testing.T, balance bool) *cluster.Cluster {
	return scheduleClusterTLS(t, balance, false)
}

// scheduleClusterTLS is scheduleCluster, with mutual TLS if tls: only the
// MDS may create the replicas the moves fill.
func scheduleClusterTLS(t *testing.T, balance, tls bool) *cluster.Cluster {
	return cluster.Start(t, cluster.Options{
		TLS: tls, ChunkServers: 6, Zones: 3, CopysetsPerChunkServer: 4,
		Schedule: mds.ScheduleConfig{
			Interval: 200 * time.Millisecond, RecoverAfter: 3 * time.Second, NoBalance: !balance,
		},
	})
}

// writer writes numbered 4 KiB blocks to the first block of a volume's
// chunks until stopped, and remembers for each chunk the values it may
// hold: the last acknowledged one, plus any attempted since that failed.
type writer struct {
	c    *cluster.Cluster
	v    volume
	stop chan struct{}
	done chan struct{}

	mu       sync.Mutex
	possible map[int][]uint64 // chunk index -> values it may hold, acknowledged first
	acked    int
}

func startWriter(t *testing.T, c *cluster.Cluster, v volume, chunks int) *writer {
	w := &writer{c: c, v: v, stop: make(chan struct{}), done: make(chan struct{}), possible: map[int][]uint64{}}
	cc := c.ChunkClient()
	go func() {
		defer close(w.done)
		for seq := uint64(1); ; seq++ {
			select {
			case <-w.stop:
				return
			default:
			}
			k := int(seq) % chunks
			ch := v.chunks[k]
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 0, block(seq))
			cancel()
			w.mu.Lock()
			if err == nil && st == chunkpb.Status_STATUS_OK {
				w.possible[k] = []uint64{seq}
				w.acked++
			} else {
				w.possible[k] = append(w.possible[k], seq)
			}
			w.mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	t.Cleanup(w.halt)
	return w
}

func (w *writer) halt() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}

func (w *writer) ackedCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked
}

// check reads every chunk written and compares it with what may be there.
func (w *writer) check(t *testing.T) {
	t.Helper()
	w.halt()
	cc := w.c.ChunkClient()
	ctx := ctxT(t)
	w.mu.Lock()
	defer w.mu.Unlock()
	for k, vals := range w.possible {
		ch := w.v.chunks[k]
		got, st, err := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), w.v.id, 0, 4096)
		if err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("read chunk %d: %v %v", ch.GetChunkId(), st, err)
		}
		seq := binary.BigEndian.Uint64(got)
		if !slices.Contains(vals, seq) || !bytes.Equal(got, block(seq)) {
			t.Fatalf("chunk %d holds block %d; the last acknowledged write was %d (then unacknowledged %v)", ch.GetChunkId(), seq, vals[0], vals[1:])
		}
	}
}

func block(seq uint64) []byte {
	b := pattern(fmt.Sprintf("|block %d|", seq), 4096)
	binary.BigEndian.PutUint64(b, seq)
	return b
}

// placement lists, for every copyset, its voters as the MDS knows them.
func placement(t *testing.T, c *cluster.Cluster) ([]*mdspb.Copyset, map[uint64]*mdspb.ChunkServer) {
	t.Helper()
	ctx := ctxT(t)
	cs, err := c.Conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	list, err := c.Conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	byID := map[uint64]*mdspb.ChunkServer{}
	for _, s := range list.GetChunkservers() {
		byID[s.GetId()] = s
	}
	return cs.GetCopysets(), byID
}

// whole checks that every copyset has three voters in three zones, none
// of them on a chunkserver in gone, no learner, and no operator pending.
func whole(t *testing.T, c *cluster.Cluster, gone ...uint64) error {
	copysets, byID := placement(t, c)
	ops, err := c.Conn.Cluster().ListOperators(context.Background(), &mdspb.ListOperatorsRequest{})
	if err != nil {
		return err
	}
	if n := len(ops.GetOperators()); n > 0 {
		return fmt.Errorf("%d operators pending (first %v)", n, ops.GetOperators()[0])
	}
	for _, cs := range copysets {
		zones := map[uint32]bool{}
		for _, p := range cs.GetPeers() {
			if slices.Contains(gone, p.GetChunkserverId()) {
				return fmt.Errorf("copyset %d keeps a replica on chunkserver %d", cs.GetId().GetCopysetId(), p.GetChunkserverId())
			}
			zones[byID[p.GetChunkserverId()].GetZoneId()] = true
		}
		if len(cs.GetPeers()) != 3 || len(zones) != 3 || len(cs.GetLearners()) != 0 || cs.GetLeaderId() == 0 {
			return fmt.Errorf("copyset %d: voters %v in %d zones, learners %v, leader %d",
				cs.GetId().GetCopysetId(), cs.GetPeers(), len(zones), cs.GetLearners(), cs.GetLeaderId())
		}
	}
	return nil
}

// sameOnEveryReplica checks that every replica of the written chunks holds
// the same bytes.
func sameOnEveryReplica(t *testing.T, c *cluster.Cluster, v volume, chunks int) {
	t.Helper()
	ctx := ctxT(t)
	copysets, byID := placement(t, c)
	for k := range chunks {
		ch := v.chunks[k]
		i := slices.IndexFunc(copysets, func(cs *mdspb.Copyset) bool { return cs.GetId().Key() == ch.GetCopyset().Key() })
		var first uint32
		for n, p := range copysets[i].GetPeers() {
			soon.Succeeds(t, 30*time.Second, func() error {
				conn, err := c.DialChunkServer(byID[p.GetChunkserverId()].GetAddress())
				if err != nil {
					return err
				}
				defer conn.Close()
				resp, err := chunkpb.NewChunkServiceClient(conn).GetChunkHash(ctx, &chunkpb.GetChunkHashRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId()})
				if err != nil || resp.GetStatus() != chunkpb.Status_STATUS_OK {
					return fmt.Errorf("hash of chunk %d on chunkserver %d: %v %v", ch.GetChunkId(), p.GetChunkserverId(), resp.GetStatus(), err)
				}
				if n == 0 {
					first = resp.GetCrc32C()
				} else if resp.GetCrc32C() != first {
					return fmt.Errorf("chunk %d: chunkserver %d holds crc %08x, chunkserver %d %08x", ch.GetChunkId(),
						p.GetChunkserverId(), resp.GetCrc32C(), copysets[i].GetPeers()[0].GetChunkserverId(), first)
				}
				return nil
			})
		}
	}
}

// index finds the cluster index of a chunkserver id.
func index(c *cluster.Cluster, id uint64) int {
	for i := range 16 {
		if s := c.ChunkServer(i); s != nil && s.ID() == id {
			return i
		}
	}
	return -1
}

// TestLostDiskIsRebuiltInItsZone kills a chunkserver, wipes its data
// directory and leaves it down past recover-after: its replicas are
// rebuilt on the other chunkserver of its zone while writes go on, and
// then it comes back as a new, empty chunkserver (the old one retired).
func TestLostDiskIsRebuiltInItsZone(t *testing.T) {
	c := scheduleCluster(t, false)
	v := openVolume(t, c, "recover")
	const chunks = 16
	w := startWriter(t, c, v, chunks)
	soon.Succeeds(t, 30*time.Second, func() error {
		if w.ackedCount() < 2*chunks {
			return fmt.Errorf("%d writes acknowledged", w.ackedCount())
		}
		return nil
	})
	lost := c.ChunkServer(0).ID()
	c.StopChunkServer(0)
	if err := os.RemoveAll(c.ChunkServerDir(0)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	soon.Succeeds(t, 2*time.Minute, func() error { return whole(t, c, lost) })
	t.Logf("rebuilt in %v (recover-after 3s)", time.Since(start).Round(100*time.Millisecond))
	acked := w.ackedCount()
	w.check(t)
	if acked < 4*chunks {
		t.Fatalf("only %d writes acknowledged through the recovery", acked)
	}
	sameOnEveryReplica(t, c, v, chunks)
	// Zone 1's other chunkserver took every replica.
	copysets, byID := placement(t, c)
	for _, cs := range copysets {
		for _, p := range cs.GetPeers() {
			if s := byID[p.GetChunkserverId()]; s.GetZone() == "zone1" && index(c, s.GetId()) != 3 {
				t.Fatalf("copyset %d has a zone 1 replica on chunkserver %d", cs.GetId().GetCopysetId(), s.GetId())
			}
		}
	}
	// The disk comes back empty: a new chunkserver; the old one is retired
	// and, holding nothing, can be deleted.
	c.StartChunkServer(0)
	if c.ChunkServer(0).ID() == lost {
		t.Fatalf("a wiped disk registered as its old chunkserver %d", lost)
	}
	_, byID = placement(t, c)
	if byID[lost].GetRwState() != mdspb.RWState_RW_STATE_RETIRED {
		t.Fatalf("old chunkserver is %s", byID[lost].GetRwState())
	}
	if _, err := c.Conn.Topology().DeleteChunkServer(ctxT(t), &mdspb.DeleteChunkServerRequest{ChunkserverId: lost}); err != nil {
		t.Fatal(err)
	}
}

// TestReplacedDiskIsRebuiltAtOnce: a chunkserver that comes back with an
// empty data directory retires its old identity, whose replicas are
// rebuilt without waiting for recover-after.
func TestReplacedDiskIsRebuiltAtOnce(t *testing.T) {
	c := cluster.Start(t, cluster.Options{
		ChunkServers: 6, Zones: 3, CopysetsPerChunkServer: 4,
		Schedule: mds.ScheduleConfig{Interval: 200 * time.Millisecond, RecoverAfter: time.Hour, NoBalance: true},
	})
	v := openVolume(t, c, "replace")
	const chunks = 8
	w := startWriter(t, c, v, chunks)
	soon.Succeeds(t, 30*time.Second, func() error {
		if w.ackedCount() < 2*chunks {
			return fmt.Errorf("%d writes acknowledged", w.ackedCount())
		}
		return nil
	})
	old := c.ChunkServer(1).ID()
	c.StopChunkServer(1)
	if err := os.RemoveAll(c.ChunkServerDir(1)); err != nil {
		t.Fatal(err)
	}
	c.StartChunkServer(1)
	soon.Succeeds(t, 2*time.Minute, func() error { return whole(t, c, old) })
	w.check(t)
	sameOnEveryReplica(t, c, v, chunks)
}

// TestRetiredChunkServerIsDrained drains a chunkserver under writes: it
// ends RETIRED with no replica, and a readwrite one cannot be deleted. The
// cluster runs with TLS, where only the MDS creates the replicas that
// replace the drained ones.
func TestRetiredChunkServerIsDrained(t *testing.T) {
	c := scheduleClusterTLS(t, false, true)
	v := openVolume(t, c, "drain")
	const chunks = 8
	w := startWriter(t, c, v, chunks)
	ctx := ctxT(t)
	id := c.ChunkServer(2).ID()
	if _, err := c.Conn.Topology().DeleteChunkServer(ctx, &mdspb.DeleteChunkServerRequest{ChunkserverId: id}); err == nil {
		t.Fatal("deleted a chunkserver in use")
	}
	resp, err := c.Conn.Topology().UpdateChunkServer(ctx, &mdspb.UpdateChunkServerRequest{ChunkserverId: id, RwState: mdspb.RWState_RW_STATE_RETIRING})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetChunkservers(); len(got) != 1 || got[0].GetRwState() != mdspb.RWState_RW_STATE_RETIRING {
		t.Fatalf("update answered %v", got)
	}
	soon.Succeeds(t, 2*time.Minute, func() error {
		if err := whole(t, c, id); err != nil {
			return err
		}
		_, byID := placement(t, c)
		if s := byID[id]; s.GetRwState() != mdspb.RWState_RW_STATE_RETIRED || s.GetCopysetCount() != 0 {
			return fmt.Errorf("chunkserver %d: %s with %d copysets", id, s.GetRwState(), s.GetCopysetCount())
		}
		return nil
	})
	w.check(t)
	sameOnEveryReplica(t, c, v, chunks)
	if _, err := c.Conn.Topology().DeleteChunkServer(ctx, &mdspb.DeleteChunkServerRequest{ChunkserverId: id}); err != nil {
		t.Fatal(err)
	}
}

// TestNewChunkServerIsBalanced adds a chunkserver to a zone: replicas in
// that zone and leaderships over the pool even out within the bounds.
func TestNewChunkServerIsBalanced(t *testing.T) {
	c := scheduleCluster(t, true)
	v := openVolume(t, c, "balance")
	const chunks = 8
	w := startWriter(t, c, v, chunks)
	i := c.AddChunkServer(1)
	added := c.ChunkServer(i).ID()
	soon.Succeeds(t, 2*time.Minute, func() error {
		if err := whole(t, c); err != nil {
			return err
		}
		copysets, byID := placement(t, c)
		replicas, leaders := map[uint64]int{}, map[uint64]int{}
		for _, cs := range copysets {
			for _, p := range cs.GetPeers() {
				replicas[p.GetChunkserverId()]++
			}
			leaders[cs.GetLeaderId()]++
		}
		zone1 := 0
		for id, s := range byID {
			if s.GetZone() == "zone1" {
				zone1 += replicas[id]
			}
		}
		// Zone 1 holds one replica of every copyset over 3 chunkservers.
		share := float64(zone1) / 3
		for id, s := range byID {
			if s.GetZone() == "zone1" && !within(replicas[id], share) {
				return fmt.Errorf("chunkserver %d holds %d replicas; share %.1f (%v)", id, replicas[id], share, replicas)
			}
			if !within(leaders[id], float64(len(copysets))/7) {
				return fmt.Errorf("chunkserver %d leads %d copysets of %d (%v)", id, leaders[id], len(copysets), leaders)
			}
		}
		if replicas[added] == 0 {
			return fmt.Errorf("the new chunkserver holds nothing")
		}
		return nil
	})
	w.check(t)
	sameOnEveryReplica(t, c, v, chunks)
}

// within reports whether n is within 10% of share, rounded outwards.
func within(n int, share float64) bool {
	return n >= int(math.Floor(share*0.9)) && n <= int(math.Ceil(share*1.1))
}

// TestReplicasRebuiltElsewhereAreTrashedWhenTheirChunkServerReturns: a
// chunkserver down past recover-after loses its replicas to others; when it
// comes back with its data, the replicas it still holds (whose own
// configuration, older than the copyset's, still names it) go to the trash
// instead of lingering and campaigning.
func TestReplicasRebuiltElsewhereAreTrashedWhenTheirChunkServerReturns(t *testing.T) {
	c := scheduleCluster(t, false)
	lost := c.ChunkServer(0).ID()
	held := len(c.ChunkServer(0).Engine().List())
	if held == 0 {
		t.Fatal("chunkserver 0 holds no replica")
	}
	c.StopChunkServer(0)
	soon.Succeeds(t, 2*time.Minute, func() error { return whole(t, c, lost) })
	s := c.StartChunkServer(0)
	if s.ID() != lost {
		t.Fatalf("came back as %d, not %d", s.ID(), lost)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		if n := len(s.Engine().List()); n > 0 {
			return fmt.Errorf("chunkserver %d still holds %d of its %d old replicas", lost, n, held)
		}
		return nil
	})
}

// TestLostIdentityWithDataIsRefused: a data directory that holds replicas
// but lost its identity file does not start as a new chunkserver (which
// would retire the old identity and discard those replicas).
func TestLostIdentityWithDataIsRefused(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	c.StopChunkServer(0)
	if err := os.Remove(filepath.Join(c.ChunkServerDir(0), "identity.json")); err != nil {
		t.Fatal(err)
	}
	s, err := chunkserver.New(c.ChunkServerConfig(0))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = s.Start(ctx)
	if err == nil {
		s.Stop()
		t.Fatal("started without its identity over existing replicas")
	}
	if !strings.Contains(err.Error(), "but no identity.json") {
		t.Fatalf("error does not say why: %v", err)
	}
}
