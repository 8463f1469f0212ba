package mds_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds/mdstest"
)

func TestRegisterCreatesTopologyOnFirstUse(t *testing.T) {
	c := newCluster(t, 3, 2, nil)
	zones, err := c.conn.Topology().ListZones(c.ctx, &mdspb.ListZonesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(zones.Zones) != 3 {
		t.Fatalf("%d zones, want 3", len(zones.Zones))
	}
	servers, err := c.conn.Topology().ListServers(c.ctx, &mdspb.ListServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(servers.Servers) != 3 { // two chunkservers per host
		t.Fatalf("%d servers, want 3", len(servers.Servers))
	}
	pools, err := c.conn.Topology().ListPools(c.ctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pools.PhysicalPools) != 1 || pools.PhysicalPools[0].Name != "pool0" {
		t.Fatalf("physical pools %v, want one named pool0", pools.PhysicalPools)
	}
	list, err := c.conn.Topology().ListChunkServers(c.ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Chunkservers) != 6 {
		t.Fatalf("%d chunkservers, want 6", len(list.Chunkservers))
	}
	for _, cs := range list.Chunkservers {
		if cs.RwState != mdspb.RWState_RW_STATE_READWRITE || cs.OnlineState != mdspb.OnlineState_ONLINE_STATE_UNKNOWN {
			t.Errorf("chunkserver %d: %s %s, want READWRITE and UNKNOWN before its first heartbeat", cs.Id, cs.RwState, cs.OnlineState)
		}
	}
	c.heartbeatAll()
	got, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: c.css[0].ID()})
	if err != nil {
		t.Fatal(err)
	}
	if got.Chunkserver.OnlineState != mdspb.OnlineState_ONLINE_STATE_ONLINE || got.Chunkserver.Address != c.css[0].Addr {
		t.Fatalf("after heartbeat: %v", got.Chunkserver)
	}
}

func TestReRegisterKeepsIdentity(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	d := c.css[0]
	id, tok := d.ID(), d.Token()
	// With the persisted id and token, from a new address.
	d2 := mdstest.StartChunkServerDouble(t, d.Hostname, d.Zone, d.PhysicalPool)
	resp, err := c.conn.Topology().RegisterChunkServer(c.ctx, &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: d.DataDir, Zone: d.Zone, PhysicalPool: d.PhysicalPool, Address: d2.Addr,
		Constants: testConstants, ChunkserverId: id, Token: tok,
	})
	if err != nil {
		t.Fatal(err)
	}
	if resp.ChunkserverId != id || resp.Token != tok {
		t.Fatalf("same identity: id %d token %s, want %d %s", resp.ChunkserverId, resp.Token, id, tok)
	}
	got, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: id})
	if err != nil {
		t.Fatal(err)
	}
	if got.Chunkserver.Address != d2.Addr || got.Chunkserver.RwState != mdspb.RWState_RW_STATE_READWRITE {
		t.Fatalf("address %s state %s, want the new %s and READWRITE", got.Chunkserver.Address, got.Chunkserver.RwState, d2.Addr)
	}
	// Id with the wrong token.
	_, err = c.conn.Topology().RegisterChunkServer(c.ctx, &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: d.DataDir, Zone: d.Zone, PhysicalPool: d.PhysicalPool, Address: d.Addr,
		Constants: testConstants, ChunkserverId: id, Token: "wrong",
	})
	wantCode(t, err, codes.Unauthenticated)
	// Unknown id.
	_, err = c.conn.Topology().RegisterChunkServer(c.ctx, &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: d.DataDir, Zone: d.Zone, PhysicalPool: d.PhysicalPool, Address: d.Addr,
		Constants: testConstants, ChunkserverId: 999, Token: tok,
	})
	wantCode(t, err, codes.NotFound)
	// Same disk claiming another zone.
	_, err = c.conn.Topology().RegisterChunkServer(c.ctx, &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: d.DataDir, Zone: "elsewhere", PhysicalPool: d.PhysicalPool, Address: d.Addr,
		Constants: testConstants,
	})
	wantCode(t, err, codes.FailedPrecondition)
	// A new disk on a known host claiming another zone.
	_, err = c.conn.Topology().RegisterChunkServer(c.ctx, &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: "/other", Zone: "elsewhere", PhysicalPool: d.PhysicalPool, Address: d.Addr,
		Constants: testConstants,
	})
	wantCode(t, err, codes.FailedPrecondition)
}

// TestReplacedDiskRegistersAsNewChunkServer: a chunkserver that comes back
// without its identity (a replaced or wiped disk at the same host and data
// directory) gets a new id, and the old one is retired so that its
// replicas are rebuilt at once.
func TestReplacedDiskRegistersAsNewChunkServer(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	d := c.css[0]
	d2 := mdstest.StartChunkServerDouble(t, d.Hostname, d.Zone, d.PhysicalPool)
	d2.DataDir = d.DataDir
	if err := d2.Register(c.ctx, c.conn.Topology(), testConstants); err != nil {
		t.Fatal(err)
	}
	if d2.ID() == d.ID() || d2.Token() == d.Token() {
		t.Fatalf("a disk without identity got the old id %d", d.ID())
	}
	old, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: d.ID()})
	if err != nil {
		t.Fatal(err)
	}
	if old.Chunkserver.RwState != mdspb.RWState_RW_STATE_RETIRED {
		t.Fatalf("replaced chunkserver is %s, want RETIRED", old.Chunkserver.RwState)
	}
	// The old identity still registers (as the retired chunkserver).
	resp, err := c.conn.Topology().RegisterChunkServer(c.ctx, &mdspb.RegisterChunkServerRequest{
		Hostname: d.Hostname, DataDir: d.DataDir, Zone: d.Zone, PhysicalPool: d.PhysicalPool, Address: d.Addr,
		Constants: testConstants, ChunkserverId: d.ID(), Token: d.Token(),
	})
	if err != nil || resp.ChunkserverId != d.ID() {
		t.Fatalf("old identity: %v, %v", resp, err)
	}
	// A third registration without identity replaces the new one, not the
	// retired one.
	d3 := mdstest.StartChunkServerDouble(t, d.Hostname, d.Zone, d.PhysicalPool)
	d3.DataDir = d.DataDir
	if err := d3.Register(c.ctx, c.conn.Topology(), testConstants); err != nil {
		t.Fatal(err)
	}
	mid, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: d2.ID()})
	if err != nil {
		t.Fatal(err)
	}
	if mid.Chunkserver.RwState != mdspb.RWState_RW_STATE_RETIRED || d3.ID() == d2.ID() {
		t.Fatalf("second replacement: %v, new id %d", mid.Chunkserver, d3.ID())
	}
}

func TestRegisterRefusesBadRequestsAndChangesNothing(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	before, err := c.conn.Topology().ListChunkServers(c.ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	good := &mdspb.RegisterChunkServerRequest{
		Hostname: "newhost", DataDir: "/d", Zone: "zone-9", PhysicalPool: "pool0", Address: "127.0.0.1:1", Constants: testConstants,
	}
	otherChunk := proto.CloneOf(testConstants)
	otherChunk.ChunkSize = 16 << 20
	for name, mutate := range map[string]func(*mdspb.RegisterChunkServerRequest){
		"no hostname":   func(r *mdspb.RegisterChunkServerRequest) { r.Hostname = "" },
		"no zone":       func(r *mdspb.RegisterChunkServerRequest) { r.Zone = "" },
		"slash in zone": func(r *mdspb.RegisterChunkServerRequest) { r.Zone = "a/b" },
		"no address":    func(r *mdspb.RegisterChunkServerRequest) { r.Address = "" },
		"no data dir":   func(r *mdspb.RegisterChunkServerRequest) { r.DataDir = "" },
		"no pool":       func(r *mdspb.RegisterChunkServerRequest) { r.PhysicalPool = "" },
	} {
		r := proto.CloneOf(good)
		mutate(r)
		_, err := c.conn.Topology().RegisterChunkServer(c.ctx, r)
		if err == nil {
			t.Fatalf("%s: accepted", name)
		}
		wantCode(t, err, codes.InvalidArgument)
	}
	r := proto.CloneOf(good)
	r.Constants = otherChunk
	_, err = c.conn.Topology().RegisterChunkServer(c.ctx, r)
	wantCode(t, err, codes.FailedPrecondition)
	if msg := err.Error(); !strings.Contains(msg, "16777216") || !strings.Contains(msg, "1048576") {
		t.Fatalf("constants mismatch message %q does not name both chunk sizes", msg)
	}
	after, err := c.conn.Topology().ListChunkServers(c.ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	zones, err := c.conn.Topology().ListZones(c.ctx, &mdspb.ListZonesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(&mdspb.ListChunkServersResponse{Chunkservers: before.Chunkservers}, after) || len(zones.Zones) != 3 {
		t.Fatalf("refused registrations changed the topology: %d chunkservers, %d zones", len(after.Chunkservers), len(zones.Zones))
	}
}

func TestCreateLogicalPoolPlacesAndCreatesCopysets(t *testing.T) {
	c := newCluster(t, 3, 3, nil)
	pool := c.createPool(6)
	if pool.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY || pool.Replicas != 3 {
		t.Fatalf("pool %v, want READY with 3 replicas", pool)
	}
	if pool.CopysetCount != 18 { // 9 chunkservers x 6 / 3
		t.Fatalf("%d copysets, want 18", pool.CopysetCount)
	}
	cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs.Copysets) != 18 {
		t.Fatalf("listed %d copysets", len(cs.Copysets))
	}
	zoneOf := map[uint64]string{}
	hosted := map[uint64]map[uint32]bool{}
	for _, d := range c.css {
		zoneOf[d.ID()] = d.Zone
		hosted[d.ID()] = map[uint32]bool{}
		for _, spec := range d.Copysets() {
			hosted[d.ID()][spec.Copyset.CopysetId] = true
		}
	}
	perCS := map[uint64]int{}
	for _, c := range cs.Copysets {
		zones := map[string]bool{}
		for _, p := range c.Peers {
			zones[zoneOf[p.ChunkserverId]] = true
			perCS[p.ChunkserverId]++
			if !hosted[p.ChunkserverId][c.Id.CopysetId] {
				t.Errorf("chunkserver %d was not asked to create copyset %d", p.ChunkserverId, c.Id.CopysetId)
			}
		}
		if len(c.Peers) != 3 || len(zones) != 3 {
			t.Errorf("copyset %d: %d peers in %d zones", c.Id.CopysetId, len(c.Peers), len(zones))
		}
		if c.LeaderId != c.Peers[0].ChunkserverId {
			t.Errorf("copyset %d: leader %d, want the reporting first peer %d", c.Id.CopysetId, c.LeaderId, c.Peers[0].ChunkserverId)
		}
	}
	for _, d := range c.css {
		if perCS[d.ID()] != 6 || len(hosted[d.ID()]) != 6 {
			t.Errorf("chunkserver %d: member of %d copysets, hosts %d; want 6", d.ID(), perCS[d.ID()], len(hosted[d.ID()]))
		}
	}
	// Creating it again returns the same pool and changes nothing.
	again, err := c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp0", PhysicalPool: "pool0", CopysetsPerChunkserver: 6})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(again.Pool, pool) {
		t.Fatalf("second create returned %v, want %v", again.Pool, pool)
	}
	cs2, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
	if err != nil {
		t.Fatal(err)
	}
	for i := range cs.Copysets {
		if !proto.Equal(cs.Copysets[i].Peers[0], cs2.Copysets[i].Peers[0]) {
			t.Fatal("second create changed the placement")
		}
	}
}

func TestCreateLogicalPoolRefusals(t *testing.T) {
	c := newCluster(t, 2, 3, nil)
	_, err := c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp0", PhysicalPool: "pool0"})
	wantCode(t, err, codes.FailedPrecondition)
	_, err = c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp0", PhysicalPool: "nope"})
	wantCode(t, err, codes.NotFound)
	_, err = c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp0", PhysicalPool: "pool0", Replicas: 2})
	wantCode(t, err, codes.InvalidArgument)
	_, err = c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{Name: "", PhysicalPool: "pool0"})
	wantCode(t, err, codes.InvalidArgument)
	pools, err := c.conn.Topology().ListPools(c.ctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pools.LogicalPools) != 0 {
		t.Fatalf("refused creates left pools: %v", pools.LogicalPools)
	}
	for _, d := range c.css {
		if n := len(d.Copysets()); n != 0 {
			t.Fatalf("chunkserver %d was asked for %d copysets", d.ID(), n)
		}
	}
}

func TestPoolCreationResumesWhenChunkServerComesBack(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.css[1].SetFailing(true)
	_, err := c.conn.Topology().CreateLogicalPool(c.ctx, &mdspb.CreateLogicalPoolRequest{Name: "lp0", PhysicalPool: "pool0", CopysetsPerChunkserver: 3})
	wantCode(t, err, codes.Aborted)
	pools, err := c.conn.Topology().ListPools(c.ctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(pools.LogicalPools) != 1 || pools.LogicalPools[0].Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_CREATING {
		t.Fatalf("pools %v, want one CREATING", pools.LogicalPools)
	}
	_, err = c.conn.Volumes().CreateVolume(c.ctx, &mdspb.CreateVolumeRequest{Name: "v", Size: 1})
	wantCode(t, err, codes.FailedPrecondition)
	c.css[1].SetFailing(false)
	soon.Succeeds(t, 10*time.Second, func() error {
		p, err := c.conn.Topology().ListPools(c.ctx, &mdspb.ListPoolsRequest{})
		if err != nil {
			return err
		}
		if s := p.LogicalPools[0].Status; s != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
			return fmt.Errorf("pool %s", s)
		}
		return nil
	})
	for _, d := range c.css {
		if len(d.Copysets()) != 3 {
			t.Fatalf("chunkserver %d hosts %d copysets, want 3", d.ID(), len(d.Copysets()))
		}
	}
}
