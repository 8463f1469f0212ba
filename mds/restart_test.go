package mds_test

import (
	"context"
	"errors"
	"sort"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/embedetcd"
	"cairn.io/cairn/mds/mdsclient"
)

// snapshot is everything an MDS knows that must survive a restart.
type snapshot struct {
	chunkservers []*mdspb.ChunkServer
	pools        *mdspb.ListPoolsResponse
	copysets     *mdspb.ListCopysetsResponse
	volumes      *mdspb.ListVolumesResponse
	segments     map[string]*mdspb.ListSegmentsResponse
	sessions     *mdspb.ListSessionsResponse
	operators    *mdspb.ListOperatorsResponse
	zones        *mdspb.ListZonesResponse
	servers      *mdspb.ListServersResponse
}

func takeSnapshot(t *testing.T, ctx context.Context, conn *mdsclient.Conn) snapshot {
	t.Helper()
	var s snapshot
	var err error
	check := func() {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	css, err := conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	check()
	for _, cs := range css.Chunkservers {
		// Live fields come from heartbeats, not from the store.
		cs.OnlineState, cs.LastHeartbeatUnix, cs.Capacity = 0, 0, nil
		s.chunkservers = append(s.chunkservers, cs)
	}
	s.pools, err = conn.Topology().ListPools(ctx, &mdspb.ListPoolsRequest{})
	check()
	s.copysets, err = conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	check()
	s.zones, err = conn.Topology().ListZones(ctx, &mdspb.ListZonesRequest{})
	check()
	s.servers, err = conn.Topology().ListServers(ctx, &mdspb.ListServersRequest{})
	check()
	s.volumes, err = conn.Volumes().ListVolumes(ctx, &mdspb.ListVolumesRequest{})
	check()
	s.segments = map[string]*mdspb.ListSegmentsResponse{}
	for _, v := range s.volumes.Volumes {
		s.segments[v.Name], err = conn.Volumes().ListSegments(ctx, &mdspb.ListSegmentsRequest{Name: v.Name})
		check()
	}
	s.sessions, err = conn.Volumes().ListSessions(ctx, &mdspb.ListSessionsRequest{})
	check()
	sort.Slice(s.sessions.Sessions, func(i, j int) bool { return s.sessions.Sessions[i].SessionId < s.sessions.Sessions[j].SessionId })
	s.operators, err = conn.Cluster().ListOperators(ctx, &mdspb.ListOperatorsRequest{})
	check()
	return s
}

func (s snapshot) equal(t *testing.T, o snapshot) {
	t.Helper()
	if len(s.chunkservers) != len(o.chunkservers) {
		t.Fatalf("%d chunkservers, then %d", len(s.chunkservers), len(o.chunkservers))
	}
	for i := range s.chunkservers {
		if !proto.Equal(s.chunkservers[i], o.chunkservers[i]) {
			t.Fatalf("chunkserver differs:\n%v\n%v", s.chunkservers[i], o.chunkservers[i])
		}
	}
	for name, pair := range map[string][2]proto.Message{
		"pools": {s.pools, o.pools}, "copysets": {s.copysets, o.copysets}, "volumes": {s.volumes, o.volumes},
		"sessions": {s.sessions, o.sessions}, "operators": {s.operators, o.operators},
		"zones": {s.zones, o.zones}, "servers": {s.servers, o.servers},
	} {
		if !proto.Equal(pair[0], pair[1]) {
			t.Fatalf("%s differ:\n%v\n%v", name, pair[0], pair[1])
		}
	}
	for name, segs := range s.segments {
		if !proto.Equal(segs, o.segments[name]) {
			t.Fatalf("segments of %s differ", name)
		}
	}
}

func TestRestartFindsEverything(t *testing.T) {
	c := newCluster(t, 3, 2, nil)
	pool := c.createPool(3)
	c.createVolume("vol0", 4*seg)
	c.createVolume("vol1", seg)
	c.allocate("vol0", 0)
	c.allocate("vol0", 3*seg)
	c.allocate("vol1", 0)
	if _, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Client: "w"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Client: "w2"}); err != nil {
		t.Fatal(err)
	}
	cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.conn.Cluster().TransferLeader(c.ctx, &mdspb.TransferLeaderRequest{Copyset: cs.Copysets[0].Id, ToChunkserverId: cs.Copysets[0].Peers[1].ChunkserverId}); err != nil {
		t.Fatal(err)
	}
	before := takeSnapshot(t, c.ctx, c.conn)
	c.mds.Stop()

	// A different constant on restart is refused.
	bad := c.cfg
	bad.Constants = proto.CloneOf(testConstants)
	bad.Constants.SegmentSize = 16 << 20
	s, err := mds.New(bad)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(c.ctx); !errors.Is(err, mds.ErrConstantsMismatch) {
		s.Stop()
		t.Fatalf("restart with another segment size: %v, want ErrConstantsMismatch", err)
	}
	// Zero constants mean "as stored".
	same := c.cfg
	same.Constants = nil
	restarted := startMDS(t, same, true)
	if !proto.Equal(restarted.Constants(), testConstants) {
		t.Fatalf("constants after restart %v", restarted.Constants())
	}
	conn := dial(t, restarted.Addr())
	after := takeSnapshot(t, c.ctx, conn)
	before.equal(t, after)

	// Chunkservers come back with their identity; new chunk ids are fresh.
	for _, d := range c.css {
		id := d.ID()
		if err := d.Register(c.ctx, conn.Topology(), testConstants); err != nil {
			t.Fatal(err)
		}
		if d.ID() != id {
			t.Fatalf("re-registration changed id %d to %d", id, d.ID())
		}
	}
	seen := map[uint64]bool{}
	for _, segs := range before.segments {
		for _, s := range segs.Segments {
			for _, ch := range s.Chunks {
				seen[ch.ChunkId] = true
			}
		}
	}
	resp, err := conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: seg, Allocate: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, ch := range resp.Segment.Chunks {
		if seen[ch.ChunkId] {
			t.Fatalf("chunk id %d reused after restart", ch.ChunkId)
		}
	}
	// The epoch goes on from where it was.
	open, err := conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	if open.Volume.Epoch != 3 {
		t.Fatalf("epoch after restart %d, want 3", open.Volume.Epoch)
	}
}

// TestFailoverWhileAllocating runs two MDS over one etcd, kills the leader
// (its election key is left to expire, as after a crash) while a client keeps
// allocating segments, and checks that the other MDS takes over with no
// metadata lost.
func TestFailoverWhileAllocating(t *testing.T) {
	ctx := context.Background()
	etcd, err := embedetcd.Start(ctx, embedetcd.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Close)
	cfgFor := func() mds.Config {
		cfg := testConfig(t, "")
		cfg.EtcdEndpoints = etcd.Endpoints()
		cfg.TestingKnobs.AbandonLeadershipOnStop = true
		return cfg
	}
	a := startMDS(t, cfgFor(), true)
	b := startMDS(t, cfgFor(), false)
	if b.Leading() {
		t.Fatal("both MDS lead")
	}
	// The follower answers with the leader's address.
	cc, err := grpc.NewClient(b.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	_, err = mdspb.NewVolumeServiceClient(cc).ListVolumes(ctx, &mdspb.ListVolumesRequest{})
	wantCode(t, err, codes.Unavailable)
	if addr, ok := mdsclient.NotLeaderAddress(err); !ok || addr != a.Addr() {
		t.Fatalf("follower answered %v; want NotLeader naming %s", err, a.Addr())
	}

	conn := dial(t, b.Addr(), a.Addr()) // the follower first: the client must follow
	c := &cluster{t: t, ctx: ctx, cfg: cfgFor(), mds: a, conn: conn}
	for z := 0; z < 3; z++ {
		d := startDouble(t, c, z)
		c.css = append(c.css, d)
	}
	c.createPool(2)
	const segments = 40
	c.createVolume("vol0", segments*seg)

	var (
		mu        sync.Mutex
		allocated = map[uint64]*mdspb.Segment{}
		wg        sync.WaitGroup
		allocErr  error
	)
	killAt := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := uint64(0); i < segments; i++ {
			if i == segments/4 {
				close(killAt)
			}
			resp, err := conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: i * seg, Allocate: true})
			if err != nil {
				allocErr = err
				return
			}
			mu.Lock()
			allocated[i] = resp.Segment
			mu.Unlock()
		}
	}()
	<-killAt
	killed := time.Now()
	a.Stop()
	soon.Succeeds(t, 20*time.Second, func() error {
		if !b.Leading() {
			return errors.New("the surviving MDS does not lead yet")
		}
		return nil
	})
	t.Logf("failover took %s", time.Since(killed).Round(time.Millisecond))
	wg.Wait()
	if allocErr != nil {
		t.Fatalf("allocation failed across the failover: %v", allocErr)
	}
	if conn.Leader() != b.Addr() {
		t.Fatalf("client follows %s, want %s", conn.Leader(), b.Addr())
	}
	list, err := conn.Volumes().ListSegments(ctx, &mdspb.ListSegmentsRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Segments) != segments {
		t.Fatalf("%d segments after failover, want %d", len(list.Segments), segments)
	}
	ids := map[uint64]bool{}
	for _, s := range list.Segments {
		if !proto.Equal(s, allocated[s.Offset/seg]) {
			t.Fatalf("segment at %d differs from what the client was given", s.Offset)
		}
		for _, ch := range s.Chunks {
			if ids[ch.ChunkId] {
				t.Fatalf("chunk id %d handed out twice", ch.ChunkId)
			}
			ids[ch.ChunkId] = true
		}
	}
}
