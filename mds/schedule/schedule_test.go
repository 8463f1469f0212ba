package schedule

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"cairn.io/cairn/mds/placement"
)

// cluster is a model the tests run Plan against: operators take effect at
// once, so a run of rounds shows where the schedulers lead.
type cluster struct {
	in Input
}

// newCluster places copysets with package placement over zones[i]
// chunkservers in zone i+1 (ids from 1), perCS replicas per chunkserver,
// leaders spread round-robin.
func newCluster(t *testing.T, zones []int, perCS int, seed uint64) *cluster {
	t.Helper()
	c := &cluster{}
	var pcs []placement.ChunkServer
	id := uint64(1)
	for z, n := range zones {
		for range n {
			c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: id, Zone: uint32(z + 1), PhysPool: 1, Online: true})
			pcs = append(pcs, placement.ChunkServer{ID: id, Zone: uint32(z + 1)})
			id++
		}
	}
	placed, err := placement.Place(placement.Request{ChunkServers: pcs, Replicas: 3, PerChunkServer: perCS}, rand.New(rand.NewPCG(seed, 1)))
	if err != nil {
		t.Fatal(err)
	}
	for i, members := range placed {
		c.in.Copysets = append(c.in.Copysets, Copyset{
			Pool: 1, PhysPool: 1, ID: uint32(i + 1), Replicas: 3, Voters: slices.Clone(members),
			Leader: members[i%len(members)], ConfEpoch: 1,
		})
	}
	return c
}

func (c *cluster) cs(id uint64) *ChunkServer {
	for i := range c.in.ChunkServers {
		if c.in.ChunkServers[i].ID == id {
			return &c.in.ChunkServers[i]
		}
	}
	return nil
}

func (c *cluster) copyset(id uint32) *Copyset {
	for i := range c.in.Copysets {
		if c.in.Copysets[i].ID == id {
			return &c.in.Copysets[i]
		}
	}
	return nil
}

// apply carries out operators the way a copyset's leader would.
func (c *cluster) apply(t *testing.T, ops []Op) {
	t.Helper()
	for _, op := range ops {
		cs := c.copyset(op.Copyset)
		if cs.ConfEpoch != op.ConfEpoch {
			t.Fatalf("%v: planned against epoch %d, copyset at %d", op, op.ConfEpoch, cs.ConfEpoch)
		}
		switch op.Kind {
		case AddPeer:
			if slices.Contains(cs.Voters, op.Target) {
				t.Fatalf("%v: target already a voter", op)
			}
			cs.Voters = append(cs.Voters, op.Target)
			cs.ConfEpoch++
		case RemovePeer:
			if op.Target == cs.Leader {
				t.Fatalf("%v: removes the leader", op)
			}
			n := len(cs.Voters)
			cs.Voters = slices.DeleteFunc(cs.Voters, func(v uint64) bool { return v == op.Target })
			cs.Learners = slices.DeleteFunc(cs.Learners, func(v uint64) bool { return v == op.Target })
			if len(cs.Voters) < n && len(cs.Voters) < cs.Replicas {
				t.Fatalf("%v: leaves %d voters of %d", op, len(cs.Voters), cs.Replicas)
			}
			cs.ConfEpoch++
		case TransferLeader:
			if !slices.Contains(cs.Voters, op.Target) {
				t.Fatalf("%v: target not a voter", op)
			}
			cs.Leader = op.Target
		}
	}
}

// elect gives a copyset whose leader is offline another live voter as
// leader, as Raft would.
func (c *cluster) elect() {
	for i := range c.in.Copysets {
		cs := &c.in.Copysets[i]
		if l := c.cs(cs.Leader); l != nil && l.Online {
			continue
		}
		for _, v := range cs.Voters {
			if c.cs(v).Online {
				cs.Leader = v
				break
			}
		}
	}
}

// converge plans and applies rounds until nothing is planned; it fails if
// a round plans more than the limit allows on one chunkserver or if it
// does not settle.
func (c *cluster) converge(t *testing.T, lim Limits) (rounds int, blocked []Blocked) {
	t.Helper()
	for rounds = 1; rounds <= 500; rounds++ {
		c.elect()
		ops, bl := Plan(c.in, lim)
		perCS := map[uint64]int{}
		perCopyset := map[uint32]int{}
		for _, op := range ops {
			perCopyset[op.Copyset]++
			if perCopyset[op.Copyset] > 1 {
				t.Fatalf("round %d: two operators on copyset %d", rounds, op.Copyset)
			}
			// What the operator charges: the leader always; the target
			// of an add (it receives a snapshot) or a transfer.
			perCS[c.copyset(op.Copyset).Leader]++
			if op.Kind != RemovePeer {
				perCS[op.Target]++
			}
		}
		max := lim.MaxOpsPerChunkServer
		if max == 0 {
			max = 2
		}
		for id, n := range perCS {
			if n+c.in.Running[id] > max {
				t.Fatalf("round %d: %d operators target chunkserver %d (limit %d)", rounds, n, id, max)
			}
		}
		if len(ops) == 0 {
			return rounds, bl
		}
		c.apply(t, ops)
	}
	t.Fatalf("did not settle in 500 rounds")
	return 0, nil
}

// checkWhole fails unless every copyset has its replicas, in distinct
// zones, on good chunkservers.
func (c *cluster) checkWhole(t *testing.T) {
	t.Helper()
	for _, cs := range c.in.Copysets {
		if len(cs.Voters) != cs.Replicas || len(cs.Learners) != 0 {
			t.Fatalf("copyset %d: voters %v learners %v", cs.ID, cs.Voters, cs.Learners)
		}
		zones := map[uint32]bool{}
		for _, v := range cs.Voters {
			s := c.cs(v)
			if s.Down || s.Retiring || s.Retired {
				t.Fatalf("copyset %d keeps a replica on chunkserver %d (%+v)", cs.ID, v, *s)
			}
			if zones[s.Zone] {
				t.Fatalf("copyset %d has two replicas in zone %d: %v", cs.ID, s.Zone, cs.Voters)
			}
			zones[s.Zone] = true
		}
		if !slices.Contains(cs.Voters, cs.Leader) {
			t.Fatalf("copyset %d: leader %d not a voter %v", cs.ID, cs.Leader, cs.Voters)
		}
	}
}

// counts returns replicas and leaderships per chunkserver.
func (c *cluster) counts() (replicas, leaders map[uint64]int) {
	replicas, leaders = map[uint64]int{}, map[uint64]int{}
	for _, cs := range c.in.Copysets {
		for _, v := range cs.Voters {
			replicas[v]++
		}
		leaders[cs.Leader]++
	}
	return replicas, leaders
}

// checkBalanced fails unless replica counts are within tolerance of the
// mean inside each zone and leader counts within tolerance of the mean
// over the pool, counting only chunkservers that may hold replicas.
func (c *cluster) checkBalanced(t *testing.T) {
	t.Helper()
	replicas, leaders := c.counts()
	within := func(what string, ids []uint64, n map[uint64]int) {
		total := 0
		for _, id := range ids {
			total += n[id]
		}
		mean := float64(total) / float64(len(ids))
		p := &planner{lim: Limits{Tolerance: 0.1}}
		lo, hi := p.bounds(mean)
		for _, id := range ids {
			if n[id] < lo || n[id] > hi {
				t.Fatalf("%s: chunkserver %d has %d (mean %.2f, bounds %d..%d): %v", what, id, n[id], mean, lo, hi, n)
			}
		}
	}
	var all []uint64
	var hs []*ChunkServer
	for i := range c.in.ChunkServers {
		if s := &c.in.ChunkServers[i]; s.accepts() {
			all = append(all, s.ID)
			hs = append(hs, s)
		}
	}
	p := newPlanner(c.in, Limits{Tolerance: 0.1})
	for id, share := range p.shares(1, hs) {
		lo, hi := p.bounds(share)
		if replicas[id] < lo || replicas[id] > hi {
			t.Fatalf("chunkserver %d has %d replicas (share %.2f, bounds %d..%d): %v", id, replicas[id], share, lo, hi, replicas)
		}
	}
	within("leaders", all, leaders)
}

func TestDownChunkServerIsReplacedInItsZone(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 8, 1)
	c.cs(1).Online, c.cs(1).Down = false, true
	before, _ := c.counts()
	if before[1] == 0 {
		t.Fatal("chunkserver 1 holds nothing to recover")
	}
	ops, _ := Plan(c.in, Limits{NoBalance: true})
	for _, op := range ops {
		if op.Kind != AddPeer || op.Target != 2 || op.Reason != ReasonRecover {
			t.Fatalf("first round planned %v; want add-peer of chunkserver 2 (zone 1's other)", op)
		}
	}
	if len(ops) != 2 {
		t.Fatalf("first round planned %d operators; the limit of 2 on chunkserver 2 allows 2", len(ops))
	}
	c.converge(t, Limits{})
	c.checkWhole(t)
	after, _ := c.counts()
	if after[1] != 0 {
		t.Fatalf("down chunkserver keeps %d replicas", after[1])
	}
}

func TestOfflineButNotDownIsLeftAlone(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 8, 2)
	c.cs(3).Online = false
	ops, blocked := Plan(c.in, Limits{})
	for _, op := range ops {
		if op.Kind != TransferLeader {
			t.Fatalf("planned %v while chunkserver 3 is only offline", op)
		}
	}
	if len(blocked) != 0 {
		t.Fatalf("blocked: %v", blocked)
	}
}

func TestRetiringChunkServerIsDrained(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 6, 3)
	c.cs(4).Retiring = true
	ops, _ := Plan(c.in, Limits{})
	if len(ops) == 0 || ops[0].Reason != ReasonDrain {
		t.Fatalf("first round: %v", ops)
	}
	c.converge(t, Limits{})
	c.checkWhole(t)
	replicas, leaders := c.counts()
	if replicas[4] != 0 || leaders[4] != 0 {
		t.Fatalf("retiring chunkserver keeps %d replicas, %d leaderships", replicas[4], leaders[4])
	}
	c.checkBalanced(t)
}

func TestNewChunkServerReceivesCopysetsAndLeaders(t *testing.T) {
	for seed := uint64(1); seed <= 5; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			c := newCluster(t, []int{2, 2, 2}, 12, seed)
			c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: 7, Zone: 1, PhysPool: 1, Online: true})
			c.converge(t, Limits{})
			c.checkWhole(t)
			c.checkBalanced(t)
			replicas, leaders := c.counts()
			if replicas[7] == 0 || leaders[7] == 0 {
				t.Fatalf("new chunkserver got %d replicas, %d leaderships", replicas[7], leaders[7])
			}
		})
	}
}

func TestLeadersPiledOnOneChunkServerSpread(t *testing.T) {
	c := newCluster(t, []int{1, 1, 1}, 9, 4)
	for i := range c.in.Copysets {
		c.in.Copysets[i].Leader = c.in.Copysets[i].Voters[slices.IndexFunc(c.in.Copysets[i].Voters, func(v uint64) bool { return v == 1 })]
	}
	rounds, _ := c.converge(t, Limits{})
	c.checkBalanced(t)
	if rounds > 10 {
		t.Fatalf("took %d rounds", rounds)
	}
}

func TestFullAndOtherPoolChunkServersAreNotTargets(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 4, 7)
	c.cs(2).Full = true
	c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: 8, Zone: 1, PhysPool: 2, Online: true})
	c.cs(1).Online, c.cs(1).Down = false, true
	_, blocked := Plan(c.in, Limits{})
	if len(blocked) == 0 {
		t.Fatal("nothing blocked with zone 1's only other chunkserver full")
	}
	c.converge(t, Limits{})
	replicas, _ := c.counts()
	if replicas[2] > 4 || replicas[8] != 0 {
		t.Fatalf("full chunkserver 2 holds %d, other pool's 8 holds %d", replicas[2], replicas[8])
	}
}

func TestBalanceWaitsForRecovery(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 8, 10)
	c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: 7, Zone: 1, PhysPool: 1, Online: true})
	c.cs(5).Online, c.cs(5).Down = false, true
	ops, _ := Plan(c.in, Limits{})
	for _, op := range ops {
		if op.Reason != ReasonRecover {
			t.Fatalf("planned %v while the pool is degraded", op)
		}
	}
}

// TestRandomFailuresConverge runs the schedulers over random topologies
// with random chunkservers down, retiring and added, and checks that they
// settle with every copyset whole and the pool balanced.
func TestRandomFailuresConverge(t *testing.T) {
	for seed := uint64(1); seed <= 400; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 2))
			zones := make([]int, 3+rng.IntN(2))
			for i := range zones {
				zones[i] = 2 + rng.IntN(3)
			}
			c := newCluster(t, zones, 4+rng.IntN(12), seed)
			c.converge(t, Limits{})
			// Up to one chunkserver down and one retiring, each in a zone
			// that keeps another chunkserver, so every copyset can be
			// repaired.
			for i := range 1 + rng.IntN(2) {
				s := &c.in.ChunkServers[rng.IntN(len(c.in.ChunkServers))]
				others := 0
				for _, o := range c.in.ChunkServers {
					if o.Zone == s.Zone && o.ID != s.ID && o.accepts() {
						others++
					}
				}
				if others == 0 || !s.accepts() {
					continue
				}
				if i == 0 {
					s.Online, s.Down = false, true
				} else {
					s.Retiring = true
				}
			}
			if rng.IntN(2) == 0 {
				c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: 100, Zone: uint32(1 + rng.IntN(len(zones))), PhysPool: 1, Online: true})
			}
			if _, blocked := c.converge(t, Limits{MaxOpsPerChunkServer: 1 + rng.IntN(3)}); len(blocked) > 0 {
				t.Fatalf("blocked: %v", blocked)
			}
			c.checkWhole(t)
			c.checkBalanced(t)
		})
	}
}

func TestSharesCapAZoneAtOneReplicaPerCopyset(t *testing.T) {
	p := &planner{members: map[uint32]map[uint64]int{1: {}}}
	var hs []*ChunkServer
	for id, zone := range []uint32{1, 2, 3, 4, 4, 4, 4, 4} {
		hs = append(hs, &ChunkServer{ID: uint64(id + 1), Zone: zone})
		p.members[1][uint64(id+1)] = 30 / 8
	}
	p.members[1][1] += 30 - 8*(30/8)
	for i := range 10 {
		p.copysets = append(p.copysets, Copyset{Pool: 1, ID: uint32(i + 1)})
	}
	got := p.shares(1, hs)
	for id, want := range map[uint64]float64{1: 20.0 / 3, 2: 20.0 / 3, 3: 20.0 / 3, 4: 2, 8: 2} {
		if math.Abs(got[id]-want) > 1e-9 {
			t.Fatalf("share of chunkserver %d = %.3f, want %.3f (all: %v)", id, got[id], want, got)
		}
	}
}

func TestSummarize(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 4, 12)
	c.cs(1).Online, c.cs(1).Down = false, true
	holding := 0
	for _, cs := range c.in.Copysets {
		if slices.Contains(cs.Voters, 1) {
			holding++
		}
	}
	c.in.Copysets[0].Learners = []uint64{99}
	s := Summarize(c.in)
	if len(s.ToRepair) != holding {
		t.Fatalf("%d copysets to repair, want the %d on the down chunkserver", len(s.ToRepair), holding)
	}
	moving := 0
	if !slices.Contains(c.in.Copysets[0].Voters, 1) {
		moving = 1
	}
	if len(s.Moving) != moving {
		t.Fatalf("%d moving, want %d", len(s.Moving), moving)
	}
	c.converge(t, Limits{})
	if s := Summarize(c.in); len(s.ToRepair)+len(s.Moving) != 0 {
		t.Fatalf("after converging: %+v", s)
	}
}

// TestPlanCopysetRemovesTheSourceOfAMove: the step after a balance move's
// add removes the loaded source, judged by the pool's counts, not the
// chunkserver just added.
func TestPlanCopysetRemovesTheSourceOfAMove(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 12, 13)
	c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: 7, Zone: 1, PhysPool: 1, Online: true})
	ops, _ := Plan(c.in, Limits{MaxOpsPerChunkServer: 100})
	var add Op
	for _, op := range ops {
		if op.Kind == AddPeer && op.Target == 7 {
			add = op
		}
	}
	if add.Target == 0 {
		t.Fatalf("no move to the new chunkserver planned: %v", ops)
	}
	src := slices.Clone(c.copyset(add.Copyset).Voters)
	c.apply(t, []Op{add})
	next, ok := PlanCopyset(c.in, Limits{}, add.Pool, add.Copyset)
	if leader := c.copyset(add.Copyset).Leader; ok && next.Kind == TransferLeader {
		// The source leads: leadership moves first, then it goes.
		c.apply(t, []Op{next})
		next, ok = PlanCopyset(c.in, Limits{}, add.Pool, add.Copyset)
		if next.Target != leader {
			t.Fatalf("after moving leadership off %d, next step %v", leader, next)
		}
	}
	if !ok || next.Kind != RemovePeer || next.Target == 7 || !slices.Contains(src, next.Target) {
		t.Fatalf("after adding 7 to copyset %d (voters %v): next step %v, %v", add.Copyset, src, next, ok)
	}
}

func TestPinnedCopysetsAreNotBalancedButRepaired(t *testing.T) {
	c := newCluster(t, []int{1, 1, 1}, 9, 14)
	for i := range c.in.Copysets {
		c.in.Copysets[i].Leader = 1
		c.in.Copysets[i].Pinned = true
	}
	if ops, _ := Plan(c.in, Limits{}); len(ops) != 0 {
		t.Fatalf("balanced pinned copysets: %v", ops)
	}
	c.in.ChunkServers = append(c.in.ChunkServers, ChunkServer{ID: 4, Zone: 4, PhysPool: 1, Online: true})
	c.cs(2).Online, c.cs(2).Down = false, true
	ops, _ := Plan(c.in, Limits{MaxOpsPerChunkServer: 100})
	if len(ops) == 0 || ops[0].Reason != ReasonRecover {
		t.Fatalf("pinned copysets not repaired: %v", ops)
	}
}

func TestALostReplicaIsReplacedBeforeADrainedOne(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 4, 15)
	cs := &c.in.Copysets[0]
	drained, lost := cs.Voters[0], cs.Voters[1]
	c.cs(drained).Retiring = true
	c.cs(lost).Online, c.cs(lost).Down = false, true
	c.elect()
	ops, _ := Plan(c.in, Limits{NoBalance: true, MaxOpsPerChunkServer: 100})
	i := slices.IndexFunc(ops, func(o Op) bool { return o.Copyset == cs.ID })
	if i < 0 || ops[i].Kind != AddPeer || c.cs(ops[i].Target).Zone != c.cs(lost).Zone || ops[i].Reason != ReasonRecover {
		t.Fatalf("first step for copyset %d (drained %d, lost %d): %v", cs.ID, drained, lost, ops)
	}
}

// TestShrinkKeepsTheLiveVoters: with a voter too many, an offline voter goes
// before a live one being drained, so the three left are all live.
func TestShrinkKeepsTheLiveVoters(t *testing.T) {
	c := newCluster(t, []int{2, 2, 2}, 4, 16)
	cs := &c.in.Copysets[0]
	var extra uint64
	for _, s := range c.in.ChunkServers {
		if !slices.Contains(cs.Voters, s.ID) && s.Zone == c.cs(cs.Voters[0]).Zone {
			extra = s.ID
		}
	}
	cs.Voters = append(cs.Voters, extra)
	cs.Leader = cs.Voters[0]
	offline, retiring := cs.Voters[1], cs.Voters[2]
	c.cs(offline).Online = false
	c.cs(retiring).Retiring = true
	ops, _ := Plan(c.in, Limits{NoBalance: true, MaxOpsPerChunkServer: 100})
	i := slices.IndexFunc(ops, func(o Op) bool { return o.Copyset == cs.ID })
	if i < 0 || ops[i].Kind != RemovePeer || ops[i].Target != offline {
		t.Fatalf("voters %v (offline %d, retiring %d): %v", cs.Voters, offline, retiring, ops)
	}
}
