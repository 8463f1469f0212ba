package placement

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
)

// topology is a random cluster shape for the property tests.
type topology struct {
	css     []ChunkServer
	perZone map[uint32]int
}

// randomTopology builds 3..8 zones of 1..6 servers with 1..4 chunkservers
// each; zones differ in size.
func randomTopology(rng *rand.Rand) topology {
	t := topology{perZone: map[uint32]int{}}
	zones := 3 + rng.IntN(6)
	id := uint64(1)
	for z := 1; z <= zones; z++ {
		servers := 1 + rng.IntN(6)
		for s := 0; s < servers; s++ {
			n := 1 + rng.IntN(4)
			for c := 0; c < n; c++ {
				t.css = append(t.css, ChunkServer{ID: id, Zone: uint32(z * 10)})
				t.perZone[uint32(z*10)]++
				id++
			}
		}
	}
	return t
}

// balanced reports whether no zone holds more than 1/replicas of the
// chunkservers, so that every chunkserver can get the same share.
func (t topology) balanced(replicas int) bool {
	for _, n := range t.perZone {
		if n*replicas > len(t.css) {
			return false
		}
	}
	return true
}

type stats struct {
	count   map[uint64]int
	peers   map[uint64]map[uint64]bool
	zoneOf  map[uint64]uint32
	perZone map[uint32]int
}

// checkInvariants verifies the properties every placement must have and
// returns per-chunkserver statistics.
func checkInvariants(t *testing.T, topo topology, req Request, got []Copyset) stats {
	t.Helper()
	st := stats{count: map[uint64]int{}, peers: map[uint64]map[uint64]bool{}, zoneOf: map[uint64]uint32{}, perZone: topo.perZone}
	for _, cs := range topo.css {
		st.zoneOf[cs.ID] = cs.Zone
		st.peers[cs.ID] = map[uint64]bool{}
	}
	wantCopysets := (len(topo.css)*req.PerChunkServer + req.Replicas/2) / req.Replicas
	if len(got) != wantCopysets {
		t.Fatalf("%d copysets, want %d", len(got), wantCopysets)
	}
	for i, c := range got {
		if len(c) != req.Replicas {
			t.Fatalf("copyset %d has %d members, want %d", i, len(c), req.Replicas)
		}
		zones := map[uint32]bool{}
		for _, m := range c {
			z, ok := st.zoneOf[m]
			if !ok {
				t.Fatalf("copyset %d names unknown chunkserver %d", i, m)
			}
			if zones[z] {
				t.Fatalf("copyset %d %v has two replicas in zone %d", i, c, z)
			}
			zones[z] = true
			st.count[m]++
			for _, o := range c {
				if o != m {
					st.peers[m][o] = true
				}
			}
		}
	}
	return st
}

func within(v, mean, frac float64) bool {
	return v >= mean*(1-frac)-1e-9 && v <= mean*(1+frac)+1e-9
}

func TestPlacementPropertiesRandomTopologies(t *testing.T) {
	iterations := 300
	if testing.Short() {
		iterations = 60
	}
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	for it := 0; it < iterations; it++ {
		rng := rand.New(rand.NewPCG(seed, uint64(it)))
		topo := randomTopology(rng)
		req := Request{ChunkServers: topo.css, Replicas: 3, PerChunkServer: 50 + rng.IntN(101)}
		got, err := Place(req, rng)
		if err != nil {
			t.Fatalf("iteration %d (seed %d): %v", it, seed, err)
		}
		t.Run(fmt.Sprintf("it%d", it), func(t *testing.T) {
			st := checkInvariants(t, topo, req, got)
			checkBalance(t, topo, req, st)
		})
		if t.Failed() {
			t.Fatalf("iteration %d (seed %d, %d zones %v, %d per chunkserver) failed", it, seed, len(topo.perZone), topo.perZone, req.PerChunkServer)
		}
	}
}

// checkBalance checks copyset counts and scatter widths.
//
// Copyset counts: with balanced zones every chunkserver is compared with the
// mean of all; otherwise a zone holds at most one replica of each copyset, so
// chunkservers are compared with the mean of their own zone.
//
// Scatter width: chunkservers of one zone can pair with the same set of
// peers, so each is within 20% of its zone's mean; across zones the possible
// peers differ (a chunkserver pairs only outside its zone), so none may fall
// more than 20% below the cluster mean, or below 80% of the number of
// chunkservers outside its zone when that is smaller.
func checkBalance(t *testing.T, topo topology, req Request, st stats) {
	t.Helper()
	groups := map[uint32][]uint64{}
	zones := map[uint32][]uint64{}
	var sumWidth float64
	for _, cs := range topo.css {
		key := uint32(0)
		if !topo.balanced(req.Replicas) {
			key = cs.Zone
		}
		groups[key] = append(groups[key], cs.ID)
		zones[cs.Zone] = append(zones[cs.Zone], cs.ID)
		sumWidth += float64(len(st.peers[cs.ID]))
	}
	for key, ids := range groups {
		var sum float64
		for _, id := range ids {
			sum += float64(st.count[id])
		}
		mean := sum / float64(len(ids))
		for _, id := range ids {
			if !within(float64(st.count[id]), mean, 0.2) {
				t.Errorf("group %d: chunkserver %d holds %d copysets, mean %.1f", key, id, st.count[id], mean)
			}
		}
	}
	clusterMean := sumWidth / float64(len(topo.css))
	for zone, ids := range zones {
		var sum float64
		for _, id := range ids {
			sum += float64(len(st.peers[id]))
		}
		mean := sum / float64(len(ids))
		for _, id := range ids {
			w := float64(len(st.peers[id]))
			if !within(w, mean, 0.2) {
				t.Errorf("zone %d: chunkserver %d scatter width %.0f, zone mean %.1f", zone, id, w, mean)
			}
			floor := clusterMean
			if bound := float64(len(topo.css) - topo.perZone[zone]); bound < floor {
				floor = bound
			}
			if w < 0.8*floor-1e-9 {
				t.Errorf("zone %d: chunkserver %d scatter width %.0f below 80%% of %.1f (cluster mean %.1f)", zone, id, w, floor, clusterMean)
			}
		}
	}
	if topo.balanced(req.Replicas) {
		for _, cs := range topo.css {
			if d := st.count[cs.ID] - req.PerChunkServer; d < -1 || d > 1 {
				t.Errorf("balanced zones: chunkserver %d holds %d copysets, want %d±1", cs.ID, st.count[cs.ID], req.PerChunkServer)
			}
		}
	}
}

func TestPlacementDefaultHundredPerChunkServer(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var css []ChunkServer
	for i := 0; i < 30; i++ {
		css = append(css, ChunkServer{ID: uint64(i + 1), Zone: uint32(i%3 + 1)})
	}
	req := Request{ChunkServers: css, Replicas: 3, PerChunkServer: 100}
	got, err := Place(req, rng)
	if err != nil {
		t.Fatal(err)
	}
	topo := topology{css: css, perZone: map[uint32]int{1: 10, 2: 10, 3: 10}}
	st := checkInvariants(t, topo, req, got)
	for _, cs := range css {
		if st.count[cs.ID] != 100 {
			t.Errorf("chunkserver %d holds %d copysets, want 100", cs.ID, st.count[cs.ID])
		}
		// 100 copysets give 200 peer slots over 20 possible peers: all of them.
		if len(st.peers[cs.ID]) != 20 {
			t.Errorf("chunkserver %d scatter width %d, want 20", cs.ID, len(st.peers[cs.ID]))
		}
	}
}

func TestPlacementDeterministicForSeed(t *testing.T) {
	topo := randomTopology(rand.New(rand.NewPCG(7, 7)))
	req := Request{ChunkServers: topo.css, Replicas: 3, PerChunkServer: 20}
	a, err := Place(req, rand.New(rand.NewPCG(3, 4)))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Place(req, rand.New(rand.NewPCG(3, 4)))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatal("same seed gave different placements")
	}
}

func TestPlacementRefusesBadRequests(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	twoZones := []ChunkServer{{ID: 1, Zone: 1}, {ID: 2, Zone: 2}, {ID: 3, Zone: 2}}
	if _, err := Place(Request{ChunkServers: twoZones, Replicas: 3, PerChunkServer: 10}, rng); !errors.Is(err, ErrTooFewZones) {
		t.Errorf("two zones: err %v, want ErrTooFewZones", err)
	}
	dup := []ChunkServer{{ID: 1, Zone: 1}, {ID: 1, Zone: 2}, {ID: 3, Zone: 3}}
	if _, err := Place(Request{ChunkServers: dup, Replicas: 3, PerChunkServer: 10}, rng); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("duplicate id: err %v, want ErrInvalidArgument", err)
	}
	if _, err := Place(Request{Replicas: 3, PerChunkServer: 10}, rng); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("no chunkservers: err %v, want ErrInvalidArgument", err)
	}
	ok := []ChunkServer{{ID: 1, Zone: 1}, {ID: 2, Zone: 2}, {ID: 3, Zone: 3}}
	if _, err := Place(Request{ChunkServers: ok, Replicas: 3, PerChunkServer: 0}, rng); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("zero per chunkserver: err %v, want ErrInvalidArgument", err)
	}
}

// With few copysets per chunkserver (as test clusters use) scatter width is
// bounded by the copysets themselves; the zone and count invariants still hold.
func TestPlacementPropertiesFewCopysets(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	for it := 0; it < 200; it++ {
		rng := rand.New(rand.NewPCG(seed, uint64(it)))
		topo := randomTopology(rng)
		req := Request{ChunkServers: topo.css, Replicas: 3, PerChunkServer: 1 + rng.IntN(20)}
		got, err := Place(req, rng)
		if err != nil {
			t.Fatalf("iteration %d (seed %d): %v", it, seed, err)
		}
		st := checkInvariants(t, topo, req, got)
		zoneMax := map[uint32]int{}
		zoneMin := map[uint32]int{}
		for _, cs := range topo.css {
			n := st.count[cs.ID]
			if m, ok := zoneMin[cs.Zone]; !ok || n < m {
				zoneMin[cs.Zone] = n
			}
			if n > zoneMax[cs.Zone] {
				zoneMax[cs.Zone] = n
			}
			if topo.balanced(req.Replicas) && (n < req.PerChunkServer-1 || n > req.PerChunkServer+1) {
				t.Fatalf("iteration %d (seed %d): chunkserver %d holds %d copysets, want %d±1", it, seed, cs.ID, n, req.PerChunkServer)
			}
		}
		for z := range zoneMax {
			if zoneMax[z]-zoneMin[z] > 1 {
				t.Fatalf("iteration %d (seed %d): zone %d counts range %d..%d", it, seed, z, zoneMin[z], zoneMax[z])
			}
		}
	}
}

// BenchmarkPlace200ChunkServers places the default 100 copyset replicas per
// chunkserver over 200 chunkservers in 5 zones (6,667 copysets).
func BenchmarkPlace200ChunkServers(b *testing.B) {
	var css []ChunkServer
	for i := 0; i < 200; i++ {
		css = append(css, ChunkServer{ID: uint64(i + 1), Zone: uint32(i%5 + 1)})
	}
	req := Request{ChunkServers: css, Replicas: 3, PerChunkServer: 100}
	for i := 0; i < b.N; i++ {
		if _, err := Place(req, rand.New(rand.NewPCG(uint64(i), 1))); err != nil {
			b.Fatal(err)
		}
	}
}
