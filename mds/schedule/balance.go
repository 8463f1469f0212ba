package schedule

import (
	"cmp"
	"slices"
)

// eligible reports whether a copyset can take part in balancing: healthy,
// whole, led, not pinned by an operator's choice, and untouched this round.
func (p *planner) eligible(c *Copyset) bool {
	return !c.Busy && !c.Pinned && p.leaderLive(c) && len(c.Learners) == 0 && len(c.Voters) == c.Replicas &&
		!p.needsRecovery(c) && !p.touched[[2]uint32{c.Pool, c.ID}]
}

// holders are the chunkservers of a pool's physical pool that may hold its
// replicas and leaderships: online, in use, not being drained.
func (p *planner) holders(pool uint32) []*ChunkServer {
	var phys uint32
	found := false
	for i := range p.copysets {
		if p.copysets[i].Pool == pool {
			phys, found = p.copysets[i].PhysPool, true
			break
		}
	}
	var out []*ChunkServer
	for _, cs := range p.css {
		if found && cs.PhysPool == phys && cs.accepts() {
			out = append(out, cs)
		}
	}
	slices.SortFunc(out, func(a, b *ChunkServer) int { return int(a.ID) - int(b.ID) })
	return out
}

// balanceLeaders transfers leaderships from chunkservers above the bound to
// ones below it. Where no copyset led by a loaded chunkserver has the
// unloaded one as a voter, leadership moves along a chain of copysets (A
// hands one to B, B one to C): the ends change by one, the chunkservers
// between keep their count.
func (p *planner) balanceLeaders(pool uint32) {
	hs := p.holders(pool)
	if len(hs) < 2 {
		return
	}
	in := map[uint64]bool{}
	total := 0
	for _, cs := range hs {
		in[cs.ID] = true
		total += p.leaders[pool][cs.ID]
	}
	lo, hi := p.bounds(float64(total) / float64(len(hs)))
	count := p.leaders[pool]
	if !slices.ContainsFunc(hs, func(cs *ChunkServer) bool { return count[cs.ID] < lo || count[cs.ID] > hi }) {
		return // every chunkserver within bounds: no search
	}
	byCount := slices.Clone(hs)
	for range len(p.copysets) {
		slices.SortStableFunc(byCount, func(a, b *ChunkServer) int { return count[a.ID] - count[b.ID] })
		moved := false
		for _, dst := range byCount {
			if path := p.leaderPath(pool, dst.ID, in, lo, hi); path != nil && p.affords(path) {
				for _, c := range path {
					to := p.nextLeader[c]
					p.emit(c, TransferLeader, to, ReasonBalanceLeader, c.Leader, to)
				}
				count[path[0].Leader]--
				count[dst.ID]++
				moved = true
				break
			}
		}
		if !moved {
			return
		}
	}
}

// affords reports whether every chunkserver on a path of transfers can take
// the operators it is charged (those in the middle take two).
func (p *planner) affords(path []*Copyset) bool {
	charge := map[uint64]int{}
	for _, c := range path {
		charge[c.Leader]++
		charge[p.nextLeader[c]]++
	}
	for id, n := range charge {
		if p.running[id]+n > p.lim.MaxOpsPerChunkServer {
			return false
		}
	}
	return true
}

// leaderPath finds copysets along which one leadership can move from a
// chunkserver with at least two more than dst (and above hi, or dst below
// lo) to dst: a breadth-first search backwards from dst over eligible
// copysets, each leading to one of its voters. It returns the copysets in
// order from the loaded end and records each one's new leader in
// p.nextLeader.
func (p *planner) leaderPath(pool uint32, dst uint64, in map[uint64]bool, lo, hi int) []*Copyset {
	count := p.leaders[pool]
	// via[x] is the copyset x hands leadership over in; reached from dst.
	via := map[uint64]*Copyset{dst: nil}
	frontier := []uint64{dst}
	for len(frontier) > 0 {
		var next []uint64
		for i := range p.copysets {
			c := &p.copysets[i]
			x := c.Leader
			if c.Pool != pool || !in[x] || via[x] != nil || x == dst || !p.eligible(c) {
				continue
			}
			y := uint64(0)
			for _, v := range c.Voters {
				if _, ok := via[v]; ok && slices.Contains(frontier, v) && in[v] {
					y = v
					break
				}
			}
			if y == 0 || !p.free(x, y) {
				continue
			}
			via[x] = c
			p.nextLeader[c] = y
			if count[x]-count[dst] >= 2 && (count[x] > hi || count[dst] < lo) {
				var path []*Copyset
				for n := x; n != dst; n = p.nextLeader[via[n]] {
					path = append(path, via[n])
				}
				return path
			}
			next = append(next, x)
		}
		frontier = next
	}
	return nil
}

// balanceCopysets moves replicas from chunkservers above their share of
// the pool's replicas to ones below it. A chunkserver's share is its zone's
// share split evenly; zones share the replicas in proportion to their
// chunkservers, but no zone can hold more than one replica of each copyset
// (water filling, as placement does).
func (p *planner) balanceCopysets(pool uint32) {
	hs := p.holders(pool)
	if len(hs) < 2 {
		return
	}
	target := p.shares(pool, hs)
	count := p.members[pool]
	excess := func(cs *ChunkServer) float64 { return float64(count[cs.ID]) - target[cs.ID] }
	byExcess := slices.Clone(hs)
	for range len(hs) * 4 {
		slices.SortStableFunc(byExcess, func(a, b *ChunkServer) int {
			return cmp.Or(cmp.Compare(excess(a), excess(b)), cmp.Compare(a.Used, b.Used))
		})
		if !p.moveAny(pool, byExcess, target) {
			return
		}
	}
}

// shares computes each chunkserver's share of the pool's replicas.
func (p *planner) shares(pool uint32, hs []*ChunkServer) map[uint64]float64 {
	copysets, total := 0, 0
	for i := range p.copysets {
		if p.copysets[i].Pool == pool {
			copysets++
		}
	}
	zones := map[uint32]int{}
	for _, cs := range hs {
		zones[cs.Zone]++
		total += p.members[pool][cs.ID]
	}
	share := map[uint32]float64{}
	left, n := float64(total), 0
	for _, k := range zones {
		n += k
	}
	for open := true; open; {
		open = false
		for z, k := range zones {
			if _, capped := share[z]; capped {
				continue
			}
			if left*float64(k)/float64(n) > float64(copysets) {
				share[z] = float64(copysets)
				left -= float64(copysets)
				n -= k
				open = true
				break
			}
		}
	}
	out := map[uint64]float64{}
	for _, cs := range hs {
		z, ok := share[cs.Zone]
		if !ok {
			z = left * float64(zones[cs.Zone]) / float64(n)
		}
		out[cs.ID] = z / float64(zones[cs.Zone])
	}
	return out
}

// moveAny starts one move from the chunkserver furthest above its share it
// can to the one furthest below it can (byExcess is in ascending order of
// count minus share), where that brings either inside the bounds and
// lowers the spread; it reports whether it did.
func (p *planner) moveAny(pool uint32, byExcess []*ChunkServer, target map[uint64]float64) bool {
	count := p.members[pool]
	excess := func(cs *ChunkServer) float64 { return float64(count[cs.ID]) - target[cs.ID] }
	for i := len(byExcess) - 1; i > 0; i-- {
		src := byExcess[i]
		_, srcHi := p.bounds(target[src.ID])
		for _, dst := range byExcess[:i] {
			if excess(src)-excess(dst) <= 1 {
				break
			}
			if dstLo, _ := p.bounds(target[dst.ID]); count[src.ID] <= srcHi && count[dst.ID] >= dstLo {
				continue
			}
			if p.moveOne(pool, src, dst) {
				return true
			}
		}
	}
	return false
}

// moveOne starts moving one replica of the pool from src to dst: it adds
// dst to a copyset that has src and not dst, keeping zones distinct; the
// removal of src follows once dst is a voter.
func (p *planner) moveOne(pool uint32, src, dst *ChunkServer) bool {
	for i := range p.copysets {
		c := &p.copysets[i]
		if c.Pool != pool || !p.eligible(c) || !slices.Contains(c.Voters, src.ID) || slices.Contains(c.Voters, dst.ID) {
			continue
		}
		ok := true
		for _, v := range c.Voters {
			if cs := p.css[v]; v != src.ID && cs != nil && cs.Zone == dst.Zone {
				ok = false
			}
		}
		if !ok || !p.free(c.Leader, dst.ID, src.ID) {
			continue
		}
		p.emit(c, AddPeer, dst.ID, ReasonBalanceCopyset, c.Leader, dst.ID, src.ID)
		p.members[pool][dst.ID]++
		p.members[pool][src.ID]--
		return true
	}
	return false
}
