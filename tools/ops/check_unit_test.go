package ops

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// TestJudgeCopyset feeds judgeCopyset crafted replica answers, one kind of
// trouble at a time.
func TestJudgeCopyset(t *testing.T) {
	id := &commonpb.CopysetRef{LogicalPoolId: 1, CopysetId: 7}
	peers := []*commonpb.Peer{{ChunkserverId: 1, Address: "a:1"}, {ChunkserverId: 2, Address: "a:2"}, {ChunkserverId: 3, Address: "a:3"}}
	rec := &mdspb.Copyset{Id: id, Peers: peers, LeaderId: 1}
	// healthy returns the three answers of a healthy copyset at term 3.
	healthy := func() map[uint64]*copysetpb.CopysetStatus {
		out := map[uint64]*copysetpb.CopysetStatus{}
		for _, p := range peers {
			st := &copysetpb.CopysetStatus{Copyset: id, ChunkserverId: p.ChunkserverId, Role: copysetpb.Role_ROLE_FOLLOWER,
				LeaderId: 1, Peers: peers, ConfEpoch: 4, Term: 3, CommitIndex: 100, AppliedIndex: 100, LastLogIndex: 100, FirstLogIndex: 1}
			out[p.ChunkserverId] = st
		}
		out[1].Role = copysetpb.Role_ROLE_LEADER
		for _, p := range peers {
			out[1].Progress = append(out[1].Progress, &copysetpb.PeerProgress{ChunkserverId: p.ChunkserverId, MatchIndex: 100, State: "replicate", RecentActive: true})
		}
		return out
	}
	answersOf := func(sts map[uint64]*copysetpb.CopysetStatus) map[uint64]*memberAnswers {
		out := map[uint64]*memberAnswers{}
		for id, st := range sts {
			out[id] = &memberAnswers{statuses: map[uint64]*copysetpb.CopysetStatus{st.Copyset.Key(): st}, missing: map[uint64]bool{}}
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		change func(sts map[uint64]*copysetpb.CopysetStatus, ans map[uint64]*memberAnswers)
		want   []string
		gap    uint64
	}{
		{"healthy", func(map[uint64]*copysetpb.CopysetStatus, map[uint64]*memberAnswers) {}, nil, 0},
		{"follower behind within bound", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) { s[2].AppliedIndex = 90 }, nil, 10},
		{"follower too far behind", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) { s[3].AppliedIndex = 40 },
			[]string{reasonLogGap}, 60},
		{"unreachable", func(_ map[uint64]*copysetpb.CopysetStatus, a map[uint64]*memberAnswers) {
			a[2] = &memberAnswers{err: errors.New("connection refused")}
		}, []string{reasonReplicaUnreachable}, 0},
		{"not hosted", func(_ map[uint64]*copysetpb.CopysetStatus, a map[uint64]*memberAnswers) {
			a[3] = &memberAnswers{statuses: map[uint64]*copysetpb.CopysetStatus{}, missing: map[uint64]bool{id.Key(): true}}
		}, []string{reasonReplicaMissing}, 0},
		{"no leader", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) {
			s[1].Role, s[1].Progress = copysetpb.Role_ROLE_CANDIDATE, nil
		}, []string{reasonNoLeader}, 0},
		{"two leaders", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) {
			s[2].Role, s[2].Term, s[2].LeaderId = copysetpb.Role_ROLE_LEADER, 4, 2
		}, []string{reasonNoLeader}, 0},
		{"follower names another leader", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) { s[3].LeaderId = 2 },
			[]string{reasonNoLeader}, 0},
		{"installing snapshot", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) {
			s[2].InstallingSnapshot = true
			s[1].Progress[1].State = "snapshot"
		}, []string{reasonInstallingSnapshot}, 0},
		{"leader has not heard a follower for long", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) {
			s[1].Progress[2].RecentActive = false
			s[1].Progress[2].HeardMsAgo = 4000
		}, []string{reasonUnderReplicated}, 0},
		{"a quorum check just cleared RecentActive", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) {
			s[1].Progress[2].RecentActive = false
			s[1].Progress[2].HeardMsAgo = 90
		}, nil, 0},
		{"conf epoch differs", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) { s[2].ConfEpoch = 3 },
			[]string{reasonConfMismatch}, 0},
		{"members differ from the MDS", func(s map[uint64]*copysetpb.CopysetStatus, _ map[uint64]*memberAnswers) {
			for _, st := range s {
				st.Peers = peers[:2]
			}
		}, []string{reasonConfMismatch, reasonUnderReplicated}, 0},
	} {
		sts := healthy()
		ans := answersOf(sts)
		tc.change(sts, ans)
		chk := judgeCopyset(rec, 3, ans, nil, 50)
		slices.Sort(chk.Reasons)
		want := slices.Clone(tc.want)
		slices.Sort(want)
		if !slices.Equal(chk.Reasons, want) || chk.Healthy != (len(want) == 0) {
			t.Errorf("%s: reasons %v (%s), healthy %v; want %v", tc.name, chk.Reasons, strings.Join(chk.Problems, "; "), chk.Healthy, want)
		}
		if chk.AppliedIndexGap != tc.gap {
			t.Errorf("%s: gap %d, want %d", tc.name, chk.AppliedIndexGap, tc.gap)
		}
		if len(chk.Replicas) != 3 {
			t.Errorf("%s: %d replicas reported", tc.name, len(chk.Replicas))
		}
	}
}

func TestCRCDiffer(t *testing.T) {
	rs := func(crcs ...uint32) []replicaHash {
		var out []replicaHash
		for i, c := range crcs {
			out = append(out, replicaHash{ChunkserverID: uint64(i + 1), Address: "a", CRC32C: c})
		}
		return out
	}
	if p := crcDiffer(rs(7, 7, 7)); p != "" {
		t.Errorf("equal CRCs: %q", p)
	}
	r := rs(7, 9, 7)
	p := crcDiffer(r)
	if !strings.Contains(p, "chunkserver 2 (a) has crc32c 00000009; the other 2 replica(s) have 00000007") {
		t.Errorf("one odd replica: %q", p)
	}
	if r[0].Differs || !r[1].Differs || r[2].Differs {
		t.Errorf("differs flags %v", r)
	}
	r = rs(1, 2, 3)
	if p := crcDiffer(r); !strings.HasPrefix(p, "no two replicas agree") || !r[0].Differs || !r[1].Differs || !r[2].Differs {
		t.Errorf("all differ: %q %v", p, r)
	}
	r = rs(1, 2)
	if p := crcDiffer(r); !strings.HasPrefix(p, "no two replicas agree") {
		t.Errorf("two replicas differ: %q", p)
	}
}
