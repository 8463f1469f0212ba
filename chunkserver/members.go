package chunkserver

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

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
	// retryFailed is how long after a failed question the MDS is asked
	// again (everyone is let in meanwhile).
	retryFailed = time.Second
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
	at       time.Time // when the MDS last answered (or failed to)
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
			for k := range m.entries { // make room: drop one
				delete(m.entries, k)
				break
			}
		}
		e = &memberEntry{}
		m.entries[g] = e
	}
	age := time.Since(e.at)
	switch {
	case e.failed && age < retryFailed:
		return copyset.MemberYes // the MDS is away: Raft must go on
	case e.members != nil && e.members[node] && age < memberTTL:
		return copyset.MemberYes
	case e.members != nil && !e.members[node] && age < nonMemberTTL:
		return copyset.MemberNo
	}
	if !e.fetching {
		e.fetching = true
		go m.fetch(g)
	}
	switch {
	case e.failed, e.members != nil && e.members[node]:
		return copyset.MemberYes // while asking again
	case e.members != nil:
		return copyset.MemberNo
	}
	return copyset.MemberPending
}

// fetch asks the MDS for a copyset's members.
func (m *memberCache) fetch(g copyset.GroupID) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	resp, err := m.topo.GetCopysets(ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{{LogicalPoolId: g.Pool(), CopysetId: g.Copyset()}}})
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[g]
	if e == nil {
		return
	}
	e.fetching, e.at = false, time.Now()
	switch {
	case status.Code(err) == codes.NotFound || err == nil && len(resp.GetCopysets()) == 0:
		e.failed, e.members = false, map[uint64]bool{} // the MDS knows no such copyset: no members
		return
	case err != nil:
		e.failed = true
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
	e.members = members
}
