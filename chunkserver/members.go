package chunkserver

import (
	"context"
	"sync"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/copyset"
)

// Membership answers are kept this long: members for a while (a node that
// was a member stays one until the MDS says otherwise), refusals briefly
// (a node just added is let in soon).
const (
	memberTTL    = 30 * time.Second
	nonMemberTTL = time.Second
	// maxMemberEntries bounds the cache; beyond it, it starts over.
	maxMemberEntries = 4096
)

// memberCache tells copysets whether a node that their own configuration
// does not name is a member by the MDS's view (copyset.Config.Members):
// a replica that missed membership changes must still hear its new
// leader, while a chunkserver that is no member is refused. Lookups never
// block: an unknown copyset is asked of the MDS in the background, and
// while the MDS cannot be reached every node is let in (Raft must go on
// without the MDS).
type memberCache struct {
	topo mdspb.TopologyServiceClient

	mu      sync.Mutex
	entries map[copyset.GroupID]*memberEntry
}

type memberEntry struct {
	members  map[uint64]bool
	at       time.Time // when members were learned
	fetching bool
	failed   bool // the last question did not reach the MDS
}

func newMemberCache(topo mdspb.TopologyServiceClient) *memberCache {
	return &memberCache{topo: topo, entries: map[copyset.GroupID]*memberEntry{}}
}

// answer is copyset.Config.Members.
func (m *memberCache) answer(g copyset.GroupID, node uint64) copyset.MemberAnswer {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[g]
	if e == nil {
		if len(m.entries) >= maxMemberEntries {
			m.entries = map[copyset.GroupID]*memberEntry{}
		}
		e = &memberEntry{}
		m.entries[g] = e
	}
	age := time.Since(e.at)
	switch {
	case e.members != nil && e.members[node] && age < memberTTL:
		return copyset.MemberYes
	case e.members != nil && !e.members[node] && age < nonMemberTTL:
		return copyset.MemberNo
	}
	if !e.fetching {
		e.fetching = true
		go m.fetch(g)
	}
	if e.failed {
		return copyset.MemberYes
	}
	if e.members != nil && !e.members[node] {
		return copyset.MemberNo // asked again meanwhile
	}
	return copyset.MemberPending
}

// fetch asks the MDS for a copyset's members.
func (m *memberCache) fetch(g copyset.GroupID) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	resp, err := m.topo.GetCopysets(ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{{LogicalPoolId: g.Pool(), CopysetId: g.Copyset()}}})
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[g]
	if e == nil {
		return
	}
	e.fetching = false
	if err != nil || len(resp.GetCopysets()) == 0 {
		e.failed = err != nil
		if err == nil {
			e.members, e.at = map[uint64]bool{}, time.Now() // the MDS knows no such copyset
		}
		return
	}
	e.failed = false
	cs := resp.GetCopysets()[0]
	members := map[uint64]bool{}
	for _, p := range append(cs.GetPeers(), cs.GetLearners()...) {
		members[p.GetChunkserverId()] = true
	}
	if p := cs.GetPending(); p.GetChunkserverId() != 0 {
		members[p.GetChunkserverId()] = true
	}
	e.members, e.at = members, time.Now()
}
