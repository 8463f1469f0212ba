package mds_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdsclient"
)

// The MDS side of the schedulers, with chunkserver doubles playing the
// copyset leaders that carry operators out: a drain that survives an MDS
// restart half way, and an add that does not take effect in time.

// act carries out the operators the MDS lists the way copyset leaders
// would (at once, and without Raft), and reports how many it did.
func (c *cluster) act(conn *mdsclient.Conn) int {
	c.t.Helper()
	ops, err := conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		c.t.Fatal(err)
	}
	list, err := conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		c.t.Fatal(err)
	}
	done := 0
	for _, op := range ops.Operators {
		i := slices.IndexFunc(list.Copysets, func(cs *mdspb.Copyset) bool { return cs.Id.Key() == op.Copyset.Key() })
		cs := list.Copysets[i]
		if cs.ConfEpoch != op.ConfEpoch {
			continue // already done; the MDS has not heard yet
		}
		target := op.Target.GetChunkserverId()
		peers := slices.Clone(cs.Peers)
		switch op.Kind {
		case mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER:
			c.double(cs.LeaderId).SetLeading(cs.Id, false, cs.Term)
			c.double(target).SetLeading(cs.Id, true, cs.Term+1)
			done++
			continue
		case mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER:
			peers = append(peers, &commonpb.Peer{ChunkserverId: target})
		case mdspb.OperatorKind_OPERATOR_KIND_REMOVE_PEER:
			peers = slices.DeleteFunc(peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == target })
			c.double(target).Drop(cs.Id)
		}
		for _, p := range peers {
			c.double(p.ChunkserverId).Host(&copysetpb.CopysetSpec{Copyset: cs.Id, Peers: peers}, cs.ConfEpoch+1)
		}
		c.double(cs.LeaderId).SetLeading(cs.Id, true, cs.Term)
		done++
	}
	return done
}

// replicasOn counts the copysets that name a chunkserver.
func replicasOn(t *testing.T, c *cluster, conn *mdsclient.Conn, id uint64) int {
	t.Helper()
	list, err := conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, cs := range list.Copysets {
		if slices.ContainsFunc(cs.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == id }) {
			n++
		}
	}
	return n
}

// TestDrainGoesOnAfterMDSRestart retires a chunkserver, restarts the MDS
// while the first moves are queued, and checks that the new MDS hands out
// the same operators and finishes the drain.
func TestDrainGoesOnAfterMDSRestart(t *testing.T) {
	c := newCluster(t, 4, 1, func(cfg *mds.Config) { cfg.Schedule.Interval = 50 * time.Millisecond })
	c.createPool(3)
	c.heartbeatLoop(nil)
	x := c.css[0].ID()
	if _, err := c.conn.Topology().UpdateChunkServer(c.ctx, &mdspb.UpdateChunkServerRequest{ChunkserverId: x, RwState: mdspb.RWState_RW_STATE_RETIRING}); err != nil {
		t.Fatal(err)
	}
	var queued *mdspb.ListOperatorsResponse
	soon.Succeeds(t, 10*time.Second, func() (err error) {
		queued, err = c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err == nil && len(queued.Operators) == 0 {
			err = fmt.Errorf("no operator queued")
		}
		return err
	})
	for _, op := range queued.Operators {
		if op.Reason != "drain" || op.CreatedUnix == 0 {
			t.Fatalf("operator %v", op)
		}
	}

	c.mds.Stop()
	c.mds = startMDS(t, c.cfg, true)
	conn := dial(t, c.mds.Addr())
	c.conn = conn
	after, err := conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range queued.Operators {
		if !slices.ContainsFunc(after.Operators, func(o *mdspb.Operator) bool {
			return o.Copyset.Key() == op.Copyset.Key() && o.Target.GetChunkserverId() == op.Target.GetChunkserverId()
		}) {
			t.Fatalf("operator %v lost in the restart (after: %v)", op, after.Operators)
		}
	}

	soon.Succeeds(t, 30*time.Second, func() error {
		c.act(conn)
		cs, err := conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: x})
		if err != nil {
			return err
		}
		if n := replicasOn(t, c, conn, x); n > 0 || cs.Chunkserver.RwState != mdspb.RWState_RW_STATE_RETIRED {
			return fmt.Errorf("chunkserver %d: %s, named by %d copysets", x, cs.Chunkserver.RwState, n)
		}
		return nil
	})
	list, err := conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, cs := range list.Copysets {
		if len(cs.Peers) != 3 {
			t.Fatalf("copyset %s ends with %d voters", cs.Id.Name(), len(cs.Peers))
		}
	}
	st, err := conn.Cluster().GetScheduleStatus(c.ctx, &mdspb.GetScheduleStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.CopysetsToRepair != 0 || st.CopysetsMoving != 0 || st.BalanceEnabled {
		t.Fatalf("schedule status after the drain: %v", st)
	}
}

// TestAddCreatesItsReplicaFirst: the MDS creates the empty replica an add
// fills on its target before the copyset's leader is handed the add (only
// the MDS may create copysets on a chunkserver); while the target cannot
// take it, the leader is not told to add it.
func TestAddCreatesItsReplicaFirst(t *testing.T) {
	c := newCluster(t, 4, 1, func(cfg *mds.Config) {
		cfg.Schedule.Interval = 50 * time.Millisecond
		cfg.Schedule.MaxOperatorsPerChunkServer = 100
	})
	c.createPool(3)
	c.heartbeatLoop(nil)
	for _, d := range c.css {
		d.SetFailing(true)
	}
	x := c.css[0].ID()
	if _, err := c.conn.Topology().UpdateChunkServer(c.ctx, &mdspb.UpdateChunkServerRequest{ChunkserverId: x, RwState: mdspb.RWState_RW_STATE_RETIRING}); err != nil {
		t.Fatal(err)
	}
	var adds []*mdspb.Operator
	soon.Succeeds(t, 10*time.Second, func() error {
		ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err != nil {
			return err
		}
		adds = slices.DeleteFunc(ops.Operators, func(op *mdspb.Operator) bool { return op.Kind != mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER })
		if len(adds) == 0 {
			return fmt.Errorf("no add queued")
		}
		return nil
	})
	// Chunkservers asking who may speak for the copyset learn of the
	// joining replica before the leader's next report.
	view, err := c.conn.Topology().GetCopysets(c.ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{adds[0].Copyset}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(view.Copysets[0].Learners, func(p *commonpb.Peer) bool { return p.ChunkserverId == adds[0].Target.GetChunkserverId() }) {
		t.Fatalf("copyset view %v does not name the target of %v", view.Copysets[0], adds[0])
	}
	leaders := map[uint64]uint64{} // copyset -> its leader
	list, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, cs := range list.Copysets {
		leaders[cs.Id.Key()] = cs.LeaderId
	}
	// handedOut reports how many of the adds the leaders' heartbeat
	// answers carry.
	handedOut := func() int {
		n := 0
		for _, op := range adds {
			resp, err := c.double(leaders[op.Copyset.Key()]).Heartbeat(c.ctx, c.conn.Heartbeats())
			if err != nil {
				t.Fatal(err)
			}
			if slices.ContainsFunc(resp.Operators, func(o *mdspb.Operator) bool {
				return o.Copyset.Key() == op.Copyset.Key() && o.Kind == op.Kind && o.Target.GetChunkserverId() == op.Target.GetChunkserverId()
			}) {
				n++
			}
		}
		return n
	}
	for range 5 { // a few scheduling rounds, each trying the targets again
		if n := handedOut(); n != 0 {
			t.Fatalf("%d of %d adds handed to their leaders before their targets held the replicas", n, len(adds))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, d := range c.css {
		d.SetFailing(false)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := handedOut(); n != len(adds) {
			return fmt.Errorf("%d of %d adds handed out", n, len(adds))
		}
		return nil
	})
	for _, op := range adds {
		held := c.double(op.Target.GetChunkserverId()).Copysets()
		if !slices.ContainsFunc(held, func(s *copysetpb.CopysetSpec) bool { return s.Copyset.Key() == op.Copyset.Key() && len(s.Peers) == 0 }) {
			t.Fatalf("add %v handed out, but its target holds no empty replica of the copyset", op)
		}
	}
}

// TestInheritedAddIsNotPreparedBeforeItsLeaderReports: an add that a
// previous MDS leader handed out may have finished before the new leader
// hears of it; the new leader does not create its replica again (on a
// voter that would replace a broken replica's log) until the copyset's
// leader has reported, and then sees the add done.
func TestInheritedAddIsNotPreparedBeforeItsLeaderReports(t *testing.T) {
	c := newCluster(t, 4, 1, func(cfg *mds.Config) {
		cfg.Schedule.Interval = 50 * time.Millisecond
		cfg.Schedule.MaxOperatorsPerChunkServer = 100
	})
	c.createPool(3)
	x := c.css[0].ID()
	if _, err := c.conn.Topology().UpdateChunkServer(c.ctx, &mdspb.UpdateChunkServerRequest{ChunkserverId: x, RwState: mdspb.RWState_RW_STATE_RETIRING}); err != nil {
		t.Fatal(err)
	}
	var add *mdspb.Operator
	soon.Succeeds(t, 10*time.Second, func() error {
		c.heartbeatAll()
		ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err != nil {
			return err
		}
		for _, op := range ops.Operators {
			if op.Kind == mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER && c.double(op.Target.GetChunkserverId()).CreateCalls() > 1 {
				add = op
				return nil
			}
		}
		return fmt.Errorf("no add prepared yet")
	})
	target := c.double(add.Target.GetChunkserverId())
	// The add is carried out, and the MDS leader changes before anyone
	// reports it.
	c.act(c.conn)
	c.mds.Stop()
	c.mds = startMDS(t, c.cfg, true)
	c.conn = dial(t, c.mds.Addr())
	before := target.CreateCalls()
	time.Sleep(500 * time.Millisecond) // ten scheduling rounds
	if n := target.CreateCalls(); n != before {
		t.Fatalf("the new MDS leader created the replica of an inherited add %d times before its leader reported", n-before)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		c.heartbeatAll()
		ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err != nil {
			return err
		}
		if slices.ContainsFunc(ops.Operators, func(op *mdspb.Operator) bool {
			return op.Copyset.Key() == add.Copyset.Key() && op.Kind == add.Kind && op.Target.GetChunkserverId() == add.Target.GetChunkserverId()
		}) {
			return fmt.Errorf("add still listed")
		}
		return nil
	})
	if n := target.CreateCalls(); n != before {
		t.Fatalf("the replica of an add that was done was created again (%d calls)", n-before)
	}
}

// TestAddThatDoesNotTakeEffectTimesOut: an add-peer operator whose leader
// never carries it out is dropped after the operator timeout, and the
// copyset is given to another chunkserver.
func TestAddThatDoesNotTakeEffectTimesOut(t *testing.T) {
	c := newCluster(t, 4, 2, func(cfg *mds.Config) {
		cfg.Schedule.Interval = 50 * time.Millisecond
		cfg.Schedule.OperatorTimeout = time.Second
		cfg.Schedule.MaxOperatorsPerChunkServer = 100
	})
	c.createPool(2)
	c.heartbeatLoop(nil)
	x := c.css[0].ID()
	if _, err := c.conn.Topology().UpdateChunkServer(c.ctx, &mdspb.UpdateChunkServerRequest{ChunkserverId: x, RwState: mdspb.RWState_RW_STATE_RETIRING}); err != nil {
		t.Fatal(err)
	}
	first := map[uint64]uint64{} // copyset -> target of its first add
	soon.Succeeds(t, 10*time.Second, func() error {
		ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err != nil {
			return err
		}
		for _, op := range ops.Operators {
			if _, ok := first[op.Copyset.Key()]; !ok {
				first[op.Copyset.Key()] = op.Target.GetChunkserverId()
			}
		}
		if want := replicasOn(t, c, c.conn, x); len(first) < want {
			return fmt.Errorf("%d of %d copysets have an add queued", len(first), want)
		}
		return nil
	})
	// Nobody acts; after the timeout each copyset gets an add elsewhere.
	soon.Succeeds(t, 20*time.Second, func() error {
		ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err != nil {
			return err
		}
		moved := 0
		for _, op := range ops.Operators {
			if t0, ok := first[op.Copyset.Key()]; ok && op.Target.GetChunkserverId() != t0 {
				moved++
			}
		}
		if moved < len(first) {
			return fmt.Errorf("%d of %d copysets were given another target", moved, len(first))
		}
		return nil
	})
}

// TestFullChunkServersTakeNoNewChunks: a chunkserver past the space-full
// threshold gets no chunks of new segments; when every copyset has such a
// member, allocation is refused with the reason.
func TestFullChunkServersTakeNoNewChunks(t *testing.T) {
	c := newCluster(t, 4, 1, nil)
	c.createPool(3)
	full := c.css[0]
	full.SetCapacity(&mdspb.Capacity{DiskTotalBytes: 100 << 30, DiskFreeBytes: 50 << 30, PoolUsedChunks: 97, PoolFreeChunks: 3, PoolTargetChunks: 100})
	for _, d := range c.css[1:] {
		d.SetCapacity(&mdspb.Capacity{DiskTotalBytes: 100 << 30, DiskFreeBytes: 50 << 30, PoolUsedChunks: 10, PoolFreeChunks: 90, PoolTargetChunks: 100})
	}
	c.heartbeatAll()
	c.createVolume("v", 2*seg)
	list, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	onFull := map[uint64]bool{}
	for _, cs := range list.Copysets {
		onFull[cs.Id.Key()] = slices.ContainsFunc(cs.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == full.ID() })
	}
	for _, ch := range c.allocate("v", 0).Chunks {
		if onFull[ch.Copyset.Key()] {
			t.Fatalf("chunk %d went to copyset %s, which has full chunkserver %d", ch.ChunkId, ch.Copyset.Name(), full.ID())
		}
	}
	// Every chunkserver full: refused, naming them.
	for _, d := range c.css {
		d.SetCapacity(&mdspb.Capacity{DiskTotalBytes: 100 << 30, DiskFreeBytes: 50 << 30, PoolUsedChunks: 99, PoolFreeChunks: 1, PoolTargetChunks: 100})
	}
	c.heartbeatAll()
	_, err = c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "v", Offset: seg, Allocate: true})
	wantCode(t, err, codes.ResourceExhausted)
	if !strings.Contains(err.Error(), "past 95% full") {
		t.Fatalf("refusal does not say why: %v", err)
	}
}
