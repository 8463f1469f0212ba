package mds_test

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdstest"
)

func TestHeartbeatStatesFollowHeartbeatAge(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) {
		cfg.UnstableTimeout = time.Second
		cfg.OfflineTimeout = 3 * time.Second
	})
	quiet := c.css[0]
	c.heartbeatAll()
	c.heartbeatLoop(func(d *mdstest.ChunkServerDouble) bool { return d == quiet })
	state := func() mdspb.OnlineState {
		got, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: quiet.ID()})
		if err != nil {
			t.Fatal(err)
		}
		return got.Chunkserver.OnlineState
	}
	for _, want := range []mdspb.OnlineState{mdspb.OnlineState_ONLINE_STATE_UNSTABLE, mdspb.OnlineState_ONLINE_STATE_OFFLINE} {
		soon.Succeeds(t, 10*time.Second, func() error {
			if s := state(); s != want {
				return fmt.Errorf("state %s, want %s", s, want)
			}
			return nil
		})
	}
	if _, err := quiet.Heartbeat(c.ctx, c.conn.Heartbeats()); err != nil {
		t.Fatal(err)
	}
	if s := state(); s != mdspb.OnlineState_ONLINE_STATE_ONLINE {
		t.Fatalf("after a heartbeat: %s", s)
	}
	// Heartbeats with a bad identity are refused.
	_, err := c.conn.Heartbeats().Heartbeat(c.ctx, &mdspb.HeartbeatRequest{ChunkserverId: quiet.ID(), Token: "bad"})
	wantCode(t, err, codes.Unauthenticated)
	_, err = c.conn.Heartbeats().Heartbeat(c.ctx, &mdspb.HeartbeatRequest{ChunkserverId: 4242})
	wantCode(t, err, codes.NotFound)
}

func TestHeartbeatLeaderReportsNewestEpochWins(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	pool := c.createPool(1) // one copyset over the three doubles
	if pool.CopysetCount != 1 {
		t.Fatalf("%d copysets", pool.CopysetCount)
	}
	get := func() *mdspb.Copyset {
		cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
		if err != nil {
			t.Fatal(err)
		}
		return cs.Copysets[0]
	}
	cs := get()
	first := c.double(cs.Peers[0].ChunkserverId)
	second := c.double(cs.Peers[1].ChunkserverId)
	if cs.LeaderId != first.ID() {
		t.Fatalf("leader %d, want %d", cs.LeaderId, first.ID())
	}
	// The second replica becomes leader at a higher term.
	first.SetLeading(cs.Id, false, 2)
	second.SetLeading(cs.Id, true, 2)
	if _, err := second.Heartbeat(c.ctx, c.conn.Heartbeats()); err != nil {
		t.Fatal(err)
	}
	if got := get(); got.LeaderId != second.ID() || got.Term != 2 {
		t.Fatalf("leader %d term %d, want %d at term 2", got.LeaderId, got.Term, second.ID())
	}
	// A stale leader's report (older term) does not win.
	first.SetLeading(cs.Id, true, 1)
	if _, err := first.Heartbeat(c.ctx, c.conn.Heartbeats()); err != nil {
		t.Fatal(err)
	}
	if got := get(); got.LeaderId != second.ID() {
		t.Fatalf("stale report took the leadership to %d", got.LeaderId)
	}
	// A report with a newer conf epoch wins, whoever sends it.
	first.SetConfEpoch(cs.Id, 7)
	first.SetLeading(cs.Id, true, 1)
	if _, err := first.Heartbeat(c.ctx, c.conn.Heartbeats()); err != nil {
		t.Fatal(err)
	}
	if got := get(); got.LeaderId != first.ID() || got.ConfEpoch != 7 {
		t.Fatalf("leader %d conf epoch %d, want %d at 7", got.LeaderId, got.ConfEpoch, first.ID())
	}
}

func TestTransferLeaderOperatorFlow(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	pool := c.createPool(1)
	cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
	if err != nil {
		t.Fatal(err)
	}
	copyset := cs.Copysets[0]
	leader := c.double(copyset.LeaderId)
	target := c.double(copyset.Peers[2].ChunkserverId)
	cl := c.conn.Cluster()
	_, err = cl.TransferLeader(c.ctx, &mdspb.TransferLeaderRequest{Copyset: copyset.Id, ToChunkserverId: 999})
	wantCode(t, err, codes.InvalidArgument)
	_, err = cl.TransferLeader(c.ctx, &mdspb.TransferLeaderRequest{Copyset: copyset.Id, ToChunkserverId: leader.ID()})
	wantCode(t, err, codes.FailedPrecondition)
	resp, err := cl.TransferLeader(c.ctx, &mdspb.TransferLeaderRequest{Copyset: copyset.Id, ToChunkserverId: target.ID()})
	if err != nil {
		t.Fatal(err)
	}
	op := resp.Operator
	if op.Kind != mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER || op.Target.ChunkserverId != target.ID() || op.Target.Address != target.Addr {
		t.Fatalf("operator %v", op)
	}
	_, err = cl.TransferLeader(c.ctx, &mdspb.TransferLeaderRequest{Copyset: copyset.Id, ToChunkserverId: target.ID()})
	wantCode(t, err, codes.FailedPrecondition) // one pending operator per copyset
	// Followers are not handed the operator; the leader is, until done.
	hb, err := target.Heartbeat(c.ctx, c.conn.Heartbeats())
	if err != nil {
		t.Fatal(err)
	}
	if len(hb.Operators) != 0 {
		t.Fatalf("follower got operators %v", hb.Operators)
	}
	for i := 0; i < 2; i++ {
		hb, err = leader.Heartbeat(c.ctx, c.conn.Heartbeats())
		if err != nil {
			t.Fatal(err)
		}
		if len(hb.Operators) != 1 || hb.Operators[0].Target.ChunkserverId != target.ID() {
			t.Fatalf("leader heartbeat %d: operators %v", i, hb.Operators)
		}
	}
	// The transfer happens: the target reports itself leader.
	leader.SetLeading(copyset.Id, false, 2)
	target.SetLeading(copyset.Id, true, 2)
	if _, err := target.Heartbeat(c.ctx, c.conn.Heartbeats()); err != nil {
		t.Fatal(err)
	}
	ops, err := cl.ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ops.Operators) != 0 {
		t.Fatalf("operator still pending after the transfer: %v", ops.Operators)
	}
	// An operator whose copyset's configuration moves on is dropped.
	back := leader
	if _, err := cl.TransferLeader(c.ctx, &mdspb.TransferLeaderRequest{Copyset: copyset.Id, ToChunkserverId: back.ID()}); err != nil {
		t.Fatal(err)
	}
	target.SetConfEpoch(copyset.Id, 5)
	hb, err = target.Heartbeat(c.ctx, c.conn.Heartbeats())
	if err != nil {
		t.Fatal(err)
	}
	ops, err = cl.ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(hb.Operators) != 0 || len(ops.Operators) != 0 {
		t.Fatalf("operator for an old conf epoch kept: %v %v", hb.Operators, ops.Operators)
	}
}

func TestMetricsAndHealth(t *testing.T) {
	c := newCluster(t, 3, 2, nil)
	c.createPool(3)
	c.createVolume("vol0", 2*seg)
	c.allocate("vol0", 0)
	get := func(path string) string {
		resp, err := http.Get("http://" + c.mds.MetricsAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %s: %s", path, resp.Status, b)
		}
		return string(b)
	}
	if h := get("/healthz"); !strings.HasPrefix(h, "ok leader") {
		t.Fatalf("healthz %q", h)
	}
	m := get("/metrics")
	for _, want := range []string{
		"cairn_mds_leader 1",
		`cairn_mds_chunkservers{state="online"} 6`,
		`cairn_mds_copysets{health="healthy"} 6`,
		`cairn_mds_copysets{health="no_leader"} 0`,
		`cairn_mds_copysets{health="peers_offline"} 0`,
		`cairn_mds_copysets{health="under_replicated"} 0`,
		`cairn_mds_copysets{health="log_gap"} 0`,
		`cairn_mds_copysets{health="installing_snapshot"} 0`,
		"cairn_mds_segments 1",
		"cairn_mds_segments_allocated_total 1",
		"cairn_mds_allocated_bytes " + strconv.FormatFloat(seg, 'g', -1, 64),
		`cairn_mds_volumes{status="created"} 1`,
		`cairn_mds_copyset_leaders{chunkserver="1"}`,
		`cairn_mds_chunkserver_heartbeat_age_seconds{chunkserver="1"}`,
		`cairn_mds_rpc_duration_seconds_count{code="ok",method="Heartbeat"}`,
		`cairn_mds_rpc_duration_seconds_count{code="ok",method="CreateVolume"} 1`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if t.Failed() {
		t.Log(m)
	}
}

// TestCopysetHealthMetricReasons: a member that stops heartbeating counts
// its copyset under peers_offline (cairn-ops status's reason), not under
// under_replicated or healthy.
func TestCopysetHealthMetricReasons(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) {
		cfg.UnstableTimeout = 300 * time.Millisecond
		cfg.OfflineTimeout = time.Second
	})
	pool := c.createPool(1)
	cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs.Copysets) != 1 {
		t.Fatalf("%d copysets, want 1", len(cs.Copysets))
	}
	cset := cs.Copysets[0]
	var quiet uint64 // a member that does not lead
	for _, p := range cset.Peers {
		if p.ChunkserverId != cset.LeaderId {
			quiet = p.ChunkserverId
		}
	}
	c.heartbeatLoop(func(d *mdstest.ChunkServerDouble) bool { return d.ID() == quiet })
	soon.Succeeds(t, 20*time.Second, func() error {
		resp, err := http.Get("http://" + c.mds.MetricsAddr() + "/metrics")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		for _, want := range []string{
			`cairn_mds_copysets{health="healthy"} 0`,
			`cairn_mds_copysets{health="peers_offline"} 1`,
			`cairn_mds_copysets{health="no_leader"} 0`,
			`cairn_mds_copysets{health="under_replicated"} 0`,
		} {
			if !strings.Contains(string(b), want) {
				return fmt.Errorf("metrics lack %q", want)
			}
		}
		return nil
	})
}

func TestHeartbeatTellsRemovedReplicaToDropCopyset(t *testing.T) {
	c := newCluster(t, 4, 1, nil)
	pool := c.createPool(1)
	cs, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.Id})
	if err != nil {
		t.Fatal(err)
	}
	copyset := cs.Copysets[0]
	leader := c.double(copyset.LeaderId)
	removed := c.double(copyset.Peers[2].ChunkserverId)
	var spare *mdstest.ChunkServerDouble
	for _, d := range c.css {
		member := false
		for _, p := range copyset.Peers {
			member = member || p.ChunkserverId == d.ID()
		}
		if !member {
			spare = d
		}
	}
	if spare == nil {
		t.Fatalf("copyset %v covers every chunkserver", copyset)
	}
	// The leader reports a new configuration without the removed replica.
	newPeers := []*commonpb.Peer{copyset.Peers[0], copyset.Peers[1], {ChunkserverId: spare.ID(), Address: spare.Addr}}
	leader.SetPeers(copyset.Id, newPeers)
	leader.SetConfEpoch(copyset.Id, 9)
	hb, err := leader.Heartbeat(c.ctx, c.conn.Heartbeats())
	if err != nil {
		t.Fatal(err)
	}
	if len(hb.RemoveCopysets) != 0 {
		t.Fatalf("leader told to remove %v", hb.RemoveCopysets)
	}
	hb, err = removed.Heartbeat(c.ctx, c.conn.Heartbeats())
	if err != nil {
		t.Fatal(err)
	}
	if len(hb.RemoveCopysets) != 1 || hb.RemoveCopysets[0].CopysetId != copyset.Id.CopysetId {
		t.Fatalf("removed replica got remove_copysets %v", hb.RemoveCopysets)
	}
	got, err := c.conn.Topology().GetCopysets(c.ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{copyset.Id}})
	if err != nil {
		t.Fatal(err)
	}
	if g := got.Copysets[0]; g.ConfEpoch != 9 || len(g.Peers) != 3 || g.Peers[2].ChunkserverId != spare.ID() {
		t.Fatalf("copyset after the change: %v", g)
	}
}
