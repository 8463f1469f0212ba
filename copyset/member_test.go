package copyset

import (
	"testing"

	"go.etcd.io/raft/v3/raftpb"
)

// TestCheckMember: a message from a node of the replica's configuration
// passes without asking; from another node, or to a replica that knows no
// configuration yet, what Config.Members says decides.
func TestCheckMember(t *testing.T) {
	var asked []uint64
	answer := MemberYes
	c := &Copyset{id: MakeGroupID(1, 1), e: &Engine{cfg: Config{Members: func(_ GroupID, node uint64) MemberAnswer {
		asked = append(asked, node)
		return answer
	}}}}
	typ := raftpb.MsgHeartbeat
	from := func(n uint64) *raftpb.Message { return &raftpb.Message{Type: &typ, From: &n} }
	answer = MemberNo
	if err := c.checkMember(from(9)); err == nil || len(asked) != 1 {
		t.Fatalf("no configuration yet, a non-member: %v (asked %v)", err, asked)
	}
	answer = MemberYes
	if err := c.checkMember(from(1)); err != nil {
		t.Fatalf("no configuration yet, a member: %v", err)
	}
	asked = nil
	c.setMembers(&raftpb.ConfState{Voters: []uint64{1, 2}, Learners: []uint64{3}})
	for _, n := range []uint64{1, 2, 3} {
		if err := c.checkMember(from(n)); err != nil {
			t.Fatalf("member %d: %v", n, err)
		}
	}
	if len(asked) != 0 {
		t.Fatalf("asked about members %v", asked)
	}
	for _, tc := range []struct {
		a    MemberAnswer
		pass bool
	}{{MemberYes, true}, {MemberNo, false}, {MemberPending, false}} {
		answer = tc.a
		if err := c.checkMember(from(4)); (err == nil) != tc.pass {
			t.Errorf("answer %d: %v", tc.a, err)
		}
	}
	if len(asked) != 3 {
		t.Fatalf("asked %v, want node 4 three times", asked)
	}
	// A configuration change removes a node: its messages are asked about.
	c.setMembers(&raftpb.ConfState{Voters: []uint64{2, 3, 4}})
	answer = MemberNo
	if err := c.checkMember(from(1)); err == nil {
		t.Fatal("a removed member was let in")
	}
}
