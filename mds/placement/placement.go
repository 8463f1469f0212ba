package placement

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
)

// ErrTooFewZones is returned when the chunkservers span fewer zones than a
// copyset has replicas.
var ErrTooFewZones = errors.New("placement: too few zones")

// ErrInvalidArgument is returned for a request that cannot describe a pool:
// no chunkservers, a duplicate chunkserver id, or a non-positive count.
var ErrInvalidArgument = errors.New("placement: invalid argument")

// ChunkServer is a chunkserver that may receive copyset replicas.
type ChunkServer struct {
	ID   uint64
	Zone uint32
}

// Request describes the copysets to place.
type Request struct {
	// ChunkServers eligible for replicas (READWRITE and not known offline).
	ChunkServers []ChunkServer
	// Replicas per copyset; each lands in a different zone.
	Replicas int
	// PerChunkServer is the number of copyset replicas wanted per chunkserver.
	PerChunkServer int
}

// Copyset is one placed copyset: the ids of its member chunkservers, one per
// zone, in the order they were chosen.
type Copyset []uint64

// Place computes the copysets of a pool. rng drives the tie-breaks; the same
// request and seed give the same placement.
func Place(req Request, rng *rand.Rand) ([]Copyset, error) {
	if len(req.ChunkServers) == 0 || req.Replicas <= 0 || req.PerChunkServer <= 0 {
		return nil, fmt.Errorf("%w: %d chunkservers, %d replicas, %d per chunkserver",
			ErrInvalidArgument, len(req.ChunkServers), req.Replicas, req.PerChunkServer)
	}
	p, err := newPlanner(req, rng)
	if err != nil {
		return nil, err
	}
	return p.assign(), nil
}

type csState struct {
	id     uint64
	zone   int // index into planner.zones
	remain int
}

type zoneState struct {
	id     uint32
	css    []int // indexes into planner.css
	remain int
}

type planner struct {
	rng      *rand.Rand
	replicas int
	copysets int
	css      []csState
	zones    []zoneState
	// pairs[a][b] counts copysets shared by chunkservers a and b (indexes).
	pairs []map[int]int
}

func newPlanner(req Request, rng *rand.Rand) (*planner, error) {
	p := &planner{rng: rng, replicas: req.Replicas}
	seen := make(map[uint64]bool, len(req.ChunkServers))
	zoneIndex := map[uint32]int{}
	// Sort for determinism independent of the caller's order.
	css := append([]ChunkServer(nil), req.ChunkServers...)
	sort.Slice(css, func(i, j int) bool { return css[i].ID < css[j].ID })
	for _, cs := range css {
		if seen[cs.ID] {
			return nil, fmt.Errorf("%w: chunkserver %d listed twice", ErrInvalidArgument, cs.ID)
		}
		seen[cs.ID] = true
		zi, ok := zoneIndex[cs.Zone]
		if !ok {
			zi = len(p.zones)
			zoneIndex[cs.Zone] = zi
			p.zones = append(p.zones, zoneState{id: cs.Zone})
		}
		p.zones[zi].css = append(p.zones[zi].css, len(p.css))
		p.css = append(p.css, csState{id: cs.ID, zone: zi})
	}
	if len(p.zones) < req.Replicas {
		return nil, fmt.Errorf("%w: %d zones for %d replicas per copyset", ErrTooFewZones, len(p.zones), req.Replicas)
	}
	n := len(p.css)
	p.copysets = (n*req.PerChunkServer + req.Replicas/2) / req.Replicas
	if p.copysets == 0 {
		p.copysets = 1
	}
	p.pairs = make([]map[int]int, n)
	for i := range p.pairs {
		p.pairs[i] = map[int]int{}
	}
	p.setTargets()
	return p, nil
}

// setTargets shares the pool's replica slots out over zones (proportionally,
// capped at one replica per copyset) and then evenly over each zone's
// chunkservers.
func (p *planner) setTargets() {
	slots := p.copysets * p.replicas
	maxPerZone := p.copysets
	quota := make([]float64, len(p.zones))
	capped := make([]bool, len(p.zones))
	left := float64(slots)
	for {
		members := 0
		for i, z := range p.zones {
			if !capped[i] {
				members += len(z.css)
			}
		}
		changed := false
		for i, z := range p.zones {
			if capped[i] {
				continue
			}
			quota[i] = left * float64(len(z.css)) / float64(members)
			if quota[i] > float64(maxPerZone) {
				quota[i] = float64(maxPerZone)
				capped[i] = true
				left -= float64(maxPerZone)
				changed = true
			}
		}
		if !changed {
			break
		}
	}
	// Round down, then hand the remainder to the largest fractions that are
	// still under the cap.
	total := 0
	for i := range p.zones {
		p.zones[i].remain = int(quota[i])
		total += p.zones[i].remain
	}
	order := p.rng.Perm(len(p.zones))
	sort.SliceStable(order, func(a, b int) bool {
		fa := quota[order[a]] - float64(int(quota[order[a]]))
		fb := quota[order[b]] - float64(int(quota[order[b]]))
		return fa > fb
	})
	for total < slots {
		progressed := false
		for _, zi := range order {
			if total == slots {
				break
			}
			if p.zones[zi].remain < maxPerZone {
				p.zones[zi].remain++
				total++
				progressed = true
			}
		}
		if !progressed {
			break // cannot happen: zones >= replicas so the caps hold all slots
		}
	}
	for zi := range p.zones {
		z := &p.zones[zi]
		base, extra := z.remain/len(z.css), z.remain%len(z.css)
		for k, ci := range p.rng.Perm(len(z.css)) {
			p.css[z.css[ci]].remain = base
			if k < extra {
				p.css[z.css[ci]].remain++
			}
		}
	}
}

func (p *planner) assign() []Copyset {
	out := make([]Copyset, 0, p.copysets)
	zoneOrder := make([]int, len(p.zones))
	for k := 0; k < p.copysets; k++ {
		// The zones with the most slots left, ties at random.
		for i := range zoneOrder {
			zoneOrder[i] = i
		}
		p.rng.Shuffle(len(zoneOrder), func(i, j int) { zoneOrder[i], zoneOrder[j] = zoneOrder[j], zoneOrder[i] })
		sort.SliceStable(zoneOrder, func(a, b int) bool {
			return p.zones[zoneOrder[a]].remain > p.zones[zoneOrder[b]].remain
		})
		chosenZones := append([]int(nil), zoneOrder[:p.replicas]...)
		p.rng.Shuffle(len(chosenZones), func(i, j int) { chosenZones[i], chosenZones[j] = chosenZones[j], chosenZones[i] })
		members := make([]int, 0, p.replicas)
		for _, zi := range chosenZones {
			ci := p.pick(zi, members)
			members = append(members, ci)
			p.css[ci].remain--
			p.zones[zi].remain--
		}
		cs := make(Copyset, len(members))
		for i, a := range members {
			cs[i] = p.css[a].id
			for _, b := range members[:i] {
				p.pairs[a][b]++
				p.pairs[b][a]++
			}
		}
		out = append(out, cs)
	}
	return out
}

// pick chooses the chunkserver of zone zi for a copyset whose other members
// so far are chosen.
func (p *planner) pick(zi int, chosen []int) int {
	z := p.zones[zi]
	maxRemain := 0
	for _, ci := range z.css {
		if p.css[ci].remain > maxRemain {
			maxRemain = p.css[ci].remain
		}
	}
	best, bestShared, bestRemain, ties := -1, 0, 0, 0
	for _, ci := range z.css {
		r := p.css[ci].remain
		// Only chunkservers close to the fullest are candidates, so that no
		// chunkserver is left with many slots to fill at the end (which would
		// pair it with the same peers over and over).
		if r == 0 || r < maxRemain-1 {
			continue
		}
		shared := 0
		for _, m := range chosen {
			shared += p.pairs[ci][m]
		}
		switch {
		case best < 0 || shared < bestShared || (shared == bestShared && r > bestRemain):
			best, bestShared, bestRemain, ties = ci, shared, r, 1
		case shared == bestShared && r == bestRemain:
			ties++
			if p.rng.IntN(ties) == 0 {
				best = ci
			}
		}
	}
	return best
}
