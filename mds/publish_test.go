package mds_test

import (
	"context"
	"regexp"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds"
)

func TestPublicationAdmitsOnlyItsNodeAndUnpublishFences(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	c.heartbeatAll()
	vols := c.conn.Volumes()
	registerNodes(t, c, "a", "b", "c", "d")
	open := func(node string, writable bool) (*mdspb.OpenVolumeResponse, error) {
		return vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: writable, Client: "csi-" + node, Node: node})
	}
	publish := func(node string, ro bool) (*mdspb.PublishVolumeResponse, error) {
		return vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: node, ReadOnly: ro})
	}

	// Not published: a node may not open it.
	_, err := open("a", true)
	wantCode(t, err, codes.FailedPrecondition)

	p, err := publish("a", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Volume.Publications) != 1 || p.Volume.Publications[0].Node != "a" || p.Volume.Publications[0].ReadOnly || p.Volume.Epoch != 0 {
		t.Fatalf("after publish: %v", p.Volume)
	}
	if again, err := publish("a", false); err != nil || len(again.Volume.Publications) != 1 {
		t.Fatalf("publishing again: %v, %v", again, err)
	}
	_, err = publish("a", true)
	wantCode(t, err, codes.AlreadyExists)
	_, err = publish("b", true)
	wantCode(t, err, codes.FailedPrecondition)

	a, err := open("a", true)
	if err != nil {
		t.Fatal(err)
	}
	if a.Session.Node != "a" || a.Volume.Epoch != 1 {
		t.Fatalf("open on a: %v", a)
	}
	_, err = open("b", true)
	wantCode(t, err, codes.FailedPrecondition)
	_, err = open("b", false)
	wantCode(t, err, codes.FailedPrecondition)
	// Outside CSI: reading is allowed, writing is not.
	_, err = vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Client: "gateway"})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Client: "checker"}); err != nil {
		t.Fatal(err)
	}
	// Node a is alive (its session is live): b cannot take the volume.
	_, err = publish("b", false)
	wantCode(t, err, codes.FailedPrecondition)
	_, err = vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "vol0"})
	wantMessage(t, err, codes.FailedPrecondition, regexp.QuoteMeta(`delete volume "vol0": it is published to node "a" for writing; unpublish it first, or force it (use --force)`))

	// Unpublishing fences a: the epoch moved on every chunkserver before
	// the call returned, and a may not open it again.
	u, err := vols.UnpublishVolume(c.ctx, &mdspb.UnpublishVolumeRequest{Name: "vol0", Node: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if u.Volume.Epoch != 2 || len(u.Volume.Publications) != 0 {
		t.Fatalf("after unpublish: %v", u.Volume)
	}
	for _, d := range c.css {
		if d.Epoch(v.Id) != 2 {
			t.Fatalf("chunkserver %d holds epoch %d after the unpublish returned, want 2", d.ID(), d.Epoch(v.Id))
		}
	}
	_, err = vols.RefreshSession(c.ctx, &mdspb.RefreshSessionRequest{Name: "vol0", SessionId: a.Session.SessionId})
	wantCode(t, err, codes.FailedPrecondition)
	_, err = open("a", true)
	wantCode(t, err, codes.FailedPrecondition)
	if u, err := vols.UnpublishVolume(c.ctx, &mdspb.UnpublishVolumeRequest{Name: "vol0", Node: "a"}); err != nil || u.Volume.Epoch != 2 {
		t.Fatalf("unpublishing again: %v, %v", u, err)
	}

	// Read-only to many nodes; then no writer until they are gone.
	for _, n := range []string{"b", "c"} {
		if _, err := publish(n, true); err != nil {
			t.Fatal(err)
		}
		if _, err := open(n, false); err != nil {
			t.Fatal(err)
		}
		_, err = open(n, true)
		wantCode(t, err, codes.FailedPrecondition)
	}
	_, err = publish("d", false)
	wantCode(t, err, codes.FailedPrecondition)
	u, err = vols.UnpublishVolume(c.ctx, &mdspb.UnpublishVolumeRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	if u.Volume.Epoch != 2 || len(u.Volume.Publications) != 0 {
		t.Fatalf("unpublishing readers: %v", u.Volume)
	}
	if _, err := vols.DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "vol0"}); err != nil {
		t.Fatal(err)
	}
	_, err = vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: "a"})
	wantCode(t, err, codes.NotFound)
	_, err = vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol1", Node: ""})
	wantCode(t, err, codes.InvalidArgument)
}

func TestPublishToAnUnknownNodeIsRefused(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	c.createVolume("vol0", seg)
	_, err := c.conn.Volumes().PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: "nowhere"})
	wantCode(t, err, codes.NotFound)
	registerNodes(t, c, "somewhere")
	_, err = c.conn.Volumes().PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol9", Node: "somewhere"})
	wantCode(t, err, codes.NotFound)
	ls, err := c.conn.Volumes().ListNodes(c.ctx, &mdspb.ListNodesRequest{})
	if err != nil || len(ls.Nodes) != 1 || ls.Nodes[0].Name != "somewhere" || ls.Nodes[0].Topology["zone"] != "z1" {
		t.Fatalf("nodes %v, %v", ls, err)
	}
	st, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol0"})
	if err != nil || len(st.Volume.Publications) != 0 {
		t.Fatalf("a refused publish changed the volume: %v, %v", st, err)
	}
}

func registerNodes(t *testing.T, c *cluster, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := c.conn.Volumes().RegisterNode(c.ctx, &mdspb.RegisterNodeRequest{Node: &mdspb.Node{Name: n, Topology: map[string]string{"zone": "z1"}}}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestPublishTakesOverFromADeadNodeAndFencesIt(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.SessionLease = 2 * time.Second })
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	c.heartbeatAll()
	vols := c.conn.Volumes()
	registerNodes(t, c, "a", "b")
	if _, err := vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: "a"}); err != nil {
		t.Fatal(err)
	}
	a, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Node: "a"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: "b"})
	wantCode(t, err, codes.FailedPrecondition)
	// Node a dies: its session is not refreshed and runs out.
	time.Sleep(3 * time.Second)
	p, err := vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: "b"})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Volume.Publications) != 1 || p.Volume.Publications[0].Node != "b" || p.Volume.Epoch != a.Volume.Epoch+1 {
		t.Fatalf("after the take-over: %v", p.Volume)
	}
	for _, d := range c.css {
		if d.Epoch(v.Id) != p.Volume.Epoch {
			t.Fatalf("chunkserver %d holds epoch %d, want %d: node a is not fenced", d.ID(), d.Epoch(v.Id), p.Volume.Epoch)
		}
	}
	_, err = vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Node: "a"})
	wantCode(t, err, codes.FailedPrecondition)
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Node: "b"}); err != nil {
		t.Fatal(err)
	}
}

func TestRetriedUnpublishWaitsForTheFenceTheFirstAttemptBegan(t *testing.T) {
	const lease = 3 * time.Second
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.EpochLease = lease })
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	c.heartbeatAll()
	vols := c.conn.Volumes()
	registerNodes(t, c, "a")
	if _, err := vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol0", Node: "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Node: "a"}); err != nil {
		t.Fatal(err)
	}
	// One chunkserver cannot be reached: the unpublish must wait out its
	// epoch lease, and its caller gives up first (as csi-attacher does).
	gone := c.css[1]
	gone.SetFailing(true)
	start := time.Now()
	ctx, cancel := context.WithTimeout(c.ctx, 500*time.Millisecond)
	defer cancel()
	_, err := vols.UnpublishVolume(ctx, &mdspb.UnpublishVolumeRequest{Name: "vol0", Node: "a"})
	wantCode(t, err, codes.DeadlineExceeded)
	// The retry finds nothing to remove, and still returns only once the
	// unreachable chunkserver can no longer admit node a's writes.
	u, err := vols.UnpublishVolume(c.ctx, &mdspb.UnpublishVolumeRequest{Name: "vol0", Node: "a"})
	if err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < lease && gone.Epoch(v.Id) != u.Volume.Epoch {
		t.Fatalf("the retried unpublish returned %s after the first began, before the %s lease of the chunkserver that missed the epoch ran out",
			waited, lease)
	}
	// Once fenced, a further retry returns at once even with the
	// chunkserver still unreachable (its lease ran out long ago).
	again := time.Now()
	if _, err := vols.UnpublishVolume(c.ctx, &mdspb.UnpublishVolumeRequest{Name: "vol0", Node: "a"}); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(again); took > lease {
		t.Fatalf("a retry after the fence completed took %s", took)
	}
}
