package chunkserver

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/internal/soon"
)

// fakeTopology answers GetCopysets with members, or fails.
type fakeTopology struct {
	mdspb.TopologyServiceClient
	mu      sync.Mutex
	members []uint64
	fail    bool
	calls   int
}

func (f *fakeTopology) GetCopysets(context.Context, *mdspb.GetCopysetsRequest, ...grpc.CallOption) (*mdspb.GetCopysetsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.fail {
		return nil, errors.New("MDS unreachable")
	}
	cs := &mdspb.Copyset{}
	for _, m := range f.members {
		cs.Peers = append(cs.Peers, &commonpb.Peer{ChunkserverId: m})
	}
	return &mdspb.GetCopysetsResponse{Copysets: []*mdspb.Copyset{cs}}, nil
}

// TestMemberCache: an unknown copyset is pending while the MDS is asked,
// then members pass and others are refused; while the MDS cannot be
// reached everyone passes.
func TestMemberCache(t *testing.T) {
	topo := &fakeTopology{members: []uint64{1, 2, 3}}
	m := newMemberCache(topo)
	g := copyset.MakeGroupID(1, 5)
	if a := m.answer(g, 7); a != copyset.MemberPending {
		t.Fatalf("first answer %d, want pending", a)
	}
	soon.Succeeds(t, 5*time.Second, func() error {
		if a := m.answer(g, 2); a != copyset.MemberYes {
			return errors.New("member 2 not known yet")
		}
		return nil
	})
	if a := m.answer(g, 7); a != copyset.MemberNo {
		t.Fatalf("non-member 7: %d", a)
	}
	other := copyset.MakeGroupID(1, 6)
	topo.mu.Lock()
	topo.fail = true
	topo.mu.Unlock()
	m.answer(other, 7)
	soon.Succeeds(t, 5*time.Second, func() error {
		if a := m.answer(other, 7); a != copyset.MemberYes {
			return errors.New("not let in while the MDS is away")
		}
		return nil
	})
}

// TestMemberCacheKeepsMembersWhileRefreshing: once the view is stale, a
// known member is still let in while it is asked again; a copyset the MDS
// does not know has no members.
func TestMemberCacheKeepsMembersWhileRefreshing(t *testing.T) {
	topo := &fakeTopology{members: []uint64{1, 2, 3}}
	m := newMemberCache(topo)
	g := copyset.MakeGroupID(1, 5)
	m.answer(g, 2)
	soon.Succeeds(t, 5*time.Second, func() error {
		if m.answer(g, 2) != copyset.MemberYes {
			return errors.New("member 2 not known yet")
		}
		return nil
	})
	m.mu.Lock()
	m.entries[g].at = time.Now().Add(-time.Hour) // stale
	m.mu.Unlock()
	if a := m.answer(g, 2); a != copyset.MemberYes {
		t.Fatalf("a known member while refreshing: %d", a)
	}
	if a := m.answer(g, 7); a != copyset.MemberNo {
		t.Fatalf("a non-member while refreshing: %d", a)
	}
}
