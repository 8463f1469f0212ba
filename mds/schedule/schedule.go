package schedule

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"strings"
)

// Kind is what an operator does.
type Kind int

// The operator kinds Plan returns.
const (
	// TransferLeader moves a copyset's leadership to Target.
	TransferLeader Kind = iota + 1
	// AddPeer adds Target as a learner, fills it and promotes it.
	AddPeer
	// RemovePeer removes Target (a voter or a learner).
	RemovePeer
)

func (k Kind) String() string {
	switch k {
	case TransferLeader:
		return "transfer-leader"
	case AddPeer:
		return "add-peer"
	case RemovePeer:
		return "remove-peer"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Reasons an operator is planned for; they name the operator in listings,
// logs and metrics.
const (
	ReasonRecover        = "recover"
	ReasonDrain          = "drain"
	ReasonCleanup        = "cleanup"
	ReasonBalanceLeader  = "balance-leader"
	ReasonBalanceCopyset = "balance-copyset"
)

// ChunkServer is a chunkserver as the schedulers see it.
type ChunkServer struct {
	ID       uint64
	Zone     uint32
	ZoneName string // for messages; the id when empty
	PhysPool uint32
	// Online: heard from recently enough to lead, send or receive.
	Online bool
	// Down: not heard from for longer than the recover-after delay; its
	// replicas are replaced.
	Down bool
	// Retiring: being drained. Retired: drained or replaced.
	Retiring, Retired bool
	// Full: past the threshold above which it takes no new replicas.
	Full bool
	// Used is the fraction of its space in use, for tie-breaks.
	Used float64
}

// accepts reports whether the chunkserver may receive a new replica.
func (c *ChunkServer) accepts() bool {
	return c.Online && !c.Down && !c.Retiring && !c.Retired && !c.Full
}

// Copyset is a copyset as the schedulers see it.
type Copyset struct {
	Pool      uint32 // logical pool
	PhysPool  uint32
	ID        uint32
	Replicas  int
	Voters    []uint64
	Learners  []uint64
	Leader    uint64 // 0 when none is known
	ConfEpoch uint64
	// Busy: an operator or a membership change is under way, or the
	// in-place rebuild of a broken replica; the schedulers leave it alone.
	Busy bool
	// Broken lists voters whose replica is broken beyond in-place rebuild.
	Broken []uint64
	// Avoid lists chunkservers that recently failed to take a replica of
	// this copyset in time; they are not chosen again while listed.
	Avoid []uint64
	// Pinned: an operator chose this copyset's leader by hand recently;
	// balancing leaves the copyset alone (repairs do not).
	Pinned bool
}

// Op is an operator to queue.
type Op struct {
	Pool, Copyset uint32
	Kind          Kind
	Target        uint64
	ConfEpoch     uint64
	Reason        string
}

func (o Op) String() string {
	return fmt.Sprintf("%s %d on copyset %d:%d (%s)", o.Kind, o.Target, o.Pool, o.Copyset, o.Reason)
}

// Blocked is a copyset that needs a repair no chunkserver can take now.
type Blocked struct {
	Pool, Copyset uint32
	Reason        string
}

// Input is the snapshot Plan decides from.
type Input struct {
	ChunkServers []ChunkServer
	Copysets     []Copyset
	// Running counts the operators already running that involve each
	// chunkserver.
	Running map[uint64]int
}

// Limits bound what one round plans.
type Limits struct {
	// MaxOpsPerChunkServer bounds the operators that involve one
	// chunkserver at once (default 2).
	MaxOpsPerChunkServer int
	// Tolerance is how far from the mean a chunkserver's leader or replica
	// count may be, as a fraction of the mean (default 0.1); the bounds are
	// rounded outwards to whole numbers.
	Tolerance float64
	// NoBalance turns the balance schedulers off (repair only).
	NoBalance bool
}

// Plan returns the operators to queue this round, and the copysets that
// need a repair that cannot be placed now.
func Plan(in Input, lim Limits) ([]Op, []Blocked) {
	if lim.MaxOpsPerChunkServer <= 0 {
		lim.MaxOpsPerChunkServer = 2
	}
	if lim.Tolerance <= 0 {
		lim.Tolerance = 0.1
	}
	p := newPlanner(in, lim)
	degraded := map[uint32]bool{}
	for i := range p.copysets {
		c := &p.copysets[i]
		if p.needsRecovery(c) {
			degraded[c.Pool] = true
		}
		if c.Busy || !p.leaderLive(c) {
			continue
		}
		p.repair(c)
	}
	if !lim.NoBalance {
		for _, pool := range p.pools() {
			if degraded[pool] {
				continue
			}
			p.balanceLeaders(pool)
			p.balanceCopysets(pool)
		}
	}
	return p.ops, p.blocked
}

type planner struct {
	lim      Limits
	css      map[uint64]*ChunkServer
	copysets []Copyset
	running  map[uint64]int
	// members counts each chunkserver's replicas per logical pool, after
	// the removals under way or planned.
	members map[uint32]map[uint64]int
	// leaders counts leaderships per logical pool.
	leaders map[uint32]map[uint64]int
	touched map[[2]uint32]bool // copysets given an operator this round
	// victims are the voters that copysets with a voter too many lose,
	// chosen from the counts before the planned removals.
	victims map[[2]uint32]uint64
	// nextLeader is where balanceLeaders' search moves a copyset's
	// leadership.
	nextLeader map[*Copyset]uint64
	ops        []Op
	blocked    []Blocked
}

func newPlanner(in Input, lim Limits) *planner {
	p := &planner{
		lim: lim, css: map[uint64]*ChunkServer{}, running: map[uint64]int{},
		members: map[uint32]map[uint64]int{}, leaders: map[uint32]map[uint64]int{},
		touched: map[[2]uint32]bool{}, victims: map[[2]uint32]uint64{},
		nextLeader: map[*Copyset]uint64{},
	}
	for i := range in.ChunkServers {
		c := in.ChunkServers[i]
		p.css[c.ID] = &c
	}
	for id, n := range in.Running {
		p.running[id] = n
	}
	p.copysets = slices.Clone(in.Copysets)
	slices.SortFunc(p.copysets, func(a, b Copyset) int {
		return cmp.Or(cmp.Compare(a.Pool, b.Pool), cmp.Compare(a.ID, b.ID))
	})
	for i := range p.copysets {
		c := &p.copysets[i]
		if p.members[c.Pool] == nil {
			p.members[c.Pool], p.leaders[c.Pool] = map[uint64]int{}, map[uint64]int{}
		}
		for _, m := range append(slices.Clone(c.Voters), c.Learners...) {
			p.members[c.Pool][m]++
		}
		if c.Leader != 0 {
			p.leaders[c.Pool][c.Leader]++
		}
	}
	// A copyset with a voter too many is half way through a move: count
	// it as it will be.
	for i := range p.copysets {
		if c := &p.copysets[i]; len(c.Voters) > c.Replicas {
			v := p.victim(c)
			p.victims[[2]uint32{c.Pool, c.ID}] = v
			p.members[c.Pool][v]--
		}
	}
	return p
}

func (p *planner) pools() []uint32 {
	var out []uint32
	for pool := range p.members {
		out = append(out, pool)
	}
	slices.Sort(out)
	return out
}

// bad reports whether a member's replica must be replaced.
func (p *planner) bad(c *Copyset, m uint64) bool {
	cs := p.css[m]
	return cs == nil || cs.Down || cs.Retired || cs.Retiring || slices.Contains(c.Broken, m)
}

// leaderLive reports whether the copyset's known leader can carry out an
// operator: online, not a retired chunkserver (a replaced disk's old
// identity may look online until its heartbeats age out), not broken.
// risk ranks why a member must be replaced: 3 lost (down, unknown or
// broken), 2 retired, 1 retiring, 0 not at all.
func (p *planner) risk(c *Copyset, m uint64) int {
	cs := p.css[m]
	switch {
	case cs == nil || cs.Down || slices.Contains(c.Broken, m):
		return 3
	case cs.Retired:
		return 2
	case cs.Retiring:
		return 1
	}
	return 0
}

func (p *planner) leaderLive(c *Copyset) bool {
	l := p.css[c.Leader]
	return c.Leader != 0 && l != nil && l.Online && !l.Down && !l.Retired && !slices.Contains(c.Broken, c.Leader)
}

// needsRecovery reports whether a copyset lacks a replica or has one that
// must be replaced (a move under way, with a voter too many, does not
// count).
func (p *planner) needsRecovery(c *Copyset) bool {
	if len(c.Voters) < c.Replicas {
		return true
	}
	good := 0
	for _, v := range c.Voters {
		if !p.bad(c, v) {
			good++
		}
	}
	return good < c.Replicas
}

// free reports whether every given chunkserver may take one more operator.
func (p *planner) free(ids ...uint64) bool {
	for _, id := range ids {
		if p.running[id] >= p.lim.MaxOpsPerChunkServer {
			return false
		}
	}
	return true
}

// emit queues an operator and charges it to the chunkservers it involves.
func (p *planner) emit(c *Copyset, kind Kind, target uint64, reason string, involved ...uint64) {
	p.ops = append(p.ops, Op{Pool: c.Pool, Copyset: c.ID, Kind: kind, Target: target, ConfEpoch: c.ConfEpoch, Reason: reason})
	for _, id := range involved {
		p.running[id]++
	}
	p.touched[[2]uint32{c.Pool, c.ID}] = true
}

// repair plans at most one operator that moves a copyset towards its full
// set of good replicas.
func (p *planner) repair(c *Copyset) {
	// 1. A learner nobody is adding.
	for _, l := range c.Learners {
		if slices.Contains(c.Voters, l) {
			continue // a stale record: it was promoted
		}
		if p.free(c.Leader) {
			p.emit(c, RemovePeer, l, ReasonCleanup, c.Leader)
		}
		return
	}
	// 2. A voter too many: the second half of a move.
	if len(c.Voters) > c.Replicas {
		v := p.victims[[2]uint32{c.Pool, c.ID}]
		reason := p.reasonFor(c, v)
		if v == c.Leader {
			if to := p.successor(c, v); to != 0 && p.free(c.Leader, to) {
				p.emit(c, TransferLeader, to, reason, c.Leader, to)
			}
			return
		}
		if p.free(c.Leader) {
			p.emit(c, RemovePeer, v, reason, c.Leader)
		}
		return
	}
	// 3. A replica missing or to be replaced.
	if !p.needsRecovery(c) {
		return
	}
	// The replica replaced first is the one most at risk: a lost or broken
	// one before a retired one, a retired one before one being drained.
	var replaced uint64
	live := 0
	for _, v := range c.Voters {
		if p.bad(c, v) && (replaced == 0 || p.risk(c, v) > p.risk(c, replaced)) {
			replaced = v
		}
		if cs := p.css[v]; cs != nil && cs.Online && !cs.Down && !slices.Contains(c.Broken, v) {
			live++
		}
	}
	// The promoted replica makes one voter more; the live ones and it must
	// still be a majority.
	if live+1 <= (len(c.Voters)+1)/2 {
		p.blocked = append(p.blocked, Blocked{c.Pool, c.ID, fmt.Sprintf("only %d of %d voters are live: no quorum to add a replica", live, len(c.Voters))})
		return
	}
	target, why := p.target(c, replaced)
	if target == 0 {
		p.blocked = append(p.blocked, Blocked{c.Pool, c.ID, why})
		return
	}
	if !p.free(c.Leader, target) {
		return
	}
	p.emit(c, AddPeer, target, p.reasonFor(c, replaced), c.Leader, target)
	p.members[c.Pool][target]++
	if replaced != 0 {
		p.members[c.Pool][replaced]--
	}
}

// reasonFor names why a member is being replaced.
func (p *planner) reasonFor(c *Copyset, m uint64) string {
	if cs := p.css[m]; cs != nil && (cs.Retiring || cs.Retired) && !cs.Down && !slices.Contains(c.Broken, m) {
		return ReasonDrain
	}
	if m != 0 && !p.bad(c, m) {
		return ReasonBalanceCopyset
	}
	return ReasonRecover
}

// victim chooses the voter a copyset with a voter too many loses: a lost
// one first, then one that is not online (the quorum is made of the live
// ones), then a retired or retiring one, then one sharing its zone with another voter, then the one on the
// chunkserver with the most replicas of the pool (the source of a balance
// move), the highest id last.
func (p *planner) victim(c *Copyset) uint64 {
	zones := map[uint32]int{}
	for _, v := range c.Voters {
		if cs := p.css[v]; cs != nil {
			zones[cs.Zone]++
		}
	}
	score := func(v uint64) [5]int {
		s := [5]int{}
		if p.risk(c, v) == 3 {
			s[0] = 1 // lost
		}
		if cs := p.css[v]; cs == nil || !cs.Online {
			s[1] = 1 // keep the live ones: the quorum is made of them
		}
		s[2] = p.risk(c, v) // retired, retiring
		if cs := p.css[v]; cs != nil && zones[cs.Zone] > 1 {
			s[3] = 1
		}
		s[4] = p.members[c.Pool][v]
		return s
	}
	var best uint64
	var bestScore [5]int
	for _, v := range c.Voters {
		s := score(v)
		if best == 0 || slices.Compare(s[:], bestScore[:]) > 0 || (s == bestScore && v > best) {
			best, bestScore = v, s
		}
	}
	return best
}

// successor picks the voter to take leadership from one that must go: a
// live, good voter with the fewest leaderships.
func (p *planner) successor(c *Copyset, from uint64) uint64 {
	var best uint64
	for _, v := range c.Voters {
		cs := p.css[v]
		if v == from || p.bad(c, v) || cs == nil || !cs.Online {
			continue
		}
		if best == 0 || p.leaders[c.Pool][v] < p.leaders[c.Pool][best] {
			best = v
		}
	}
	return best
}

// target chooses the chunkserver for a new replica of c that replaces
// replaced (0 when only a replica is missing), or says why there is none.
func (p *planner) target(c *Copyset, replaced uint64) (uint64, string) {
	used := map[uint32]bool{}
	for _, m := range c.Voters {
		if cs := p.css[m]; cs != nil && m != replaced {
			used[cs.Zone] = true
		}
	}
	var prefer uint32
	if cs := p.css[replaced]; cs != nil {
		prefer = cs.Zone
	}
	var best *ChunkServer
	better := func(a, b *ChunkServer) bool {
		if (a.Zone == prefer) != (b.Zone == prefer) {
			return a.Zone == prefer
		}
		if ma, mb := p.members[c.Pool][a.ID], p.members[c.Pool][b.ID]; ma != mb {
			return ma < mb
		}
		if a.Used != b.Used {
			return a.Used < b.Used
		}
		return a.ID < b.ID
	}
	for _, cs := range p.css {
		if cs.PhysPool != c.PhysPool || !cs.accepts() || used[cs.Zone] || slices.Contains(c.Avoid, cs.ID) ||
			slices.Contains(c.Voters, cs.ID) || slices.Contains(c.Learners, cs.ID) {
			continue
		}
		if best == nil || better(cs, best) {
			best = cs
		}
	}
	if best == nil {
		names := map[uint32]string{}
		for _, cs := range p.css {
			if used[cs.Zone] && cs.ZoneName != "" {
				names[cs.Zone] = cs.ZoneName
			}
		}
		zs := make([]uint32, 0, len(used))
		for z := range used {
			zs = append(zs, z)
		}
		slices.Sort(zs)
		named := make([]string, len(zs))
		for i, z := range zs {
			if named[i] = names[z]; named[i] == "" {
				named[i] = fmt.Sprint(z)
			}
		}
		return 0, fmt.Sprintf("no online chunkserver with space outside zones %s of its other replicas", strings.Join(named, ", "))
	}
	return best.ID, ""
}

// bounds are the lowest and highest counts within tolerance of mean.
func (p *planner) bounds(mean float64) (lo, hi int) {
	return int(math.Floor(mean * (1 - p.lim.Tolerance))), int(math.Ceil(mean * (1 + p.lim.Tolerance)))
}

// PlanCopyset plans the next repair step of one copyset only (the removal
// that completes a move, say), judged against the whole cluster: the
// counts that choose which voter goes are the pool's.
func PlanCopyset(in Input, lim Limits, pool, id uint32) (Op, bool) {
	if lim.MaxOpsPerChunkServer <= 0 {
		lim.MaxOpsPerChunkServer = 2
	}
	p := newPlanner(in, lim)
	for i := range p.copysets {
		if c := &p.copysets[i]; c.Pool == pool && c.ID == id && !c.Busy && p.leaderLive(c) {
			p.repair(c)
			break
		}
	}
	if len(p.ops) == 0 {
		return Op{}, false
	}
	return p.ops[0], true
}

// Summary is what the schedulers have left to do.
type Summary struct {
	// ToRepair lists copysets that miss a replica or hold one that must be
	// replaced; Moving those with a replica on its way in (a learner) or
	// out (a voter too many).
	ToRepair, Moving [][2]uint32
}

// Summarize reports the copysets that still need the schedulers.
func Summarize(in Input) Summary {
	p := newPlanner(in, Limits{})
	var s Summary
	for i := range p.copysets {
		c := &p.copysets[i]
		switch {
		case p.needsRecovery(c):
			s.ToRepair = append(s.ToRepair, [2]uint32{c.Pool, c.ID})
		case len(c.Learners) > 0 || len(c.Voters) > c.Replicas:
			s.Moving = append(s.Moving, [2]uint32{c.Pool, c.ID})
		}
	}
	return s
}
