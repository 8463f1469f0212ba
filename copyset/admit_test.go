package copyset

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/internal/soon"
)

// TestForgedRaftMessagesAreRefused: messages no correct peer sends, each of
// which panics Raft (or would install a snapshot from anyone), reach a
// follower and a leader through the engine's transport entry points. Each
// is refused; no replica breaks, the process goes on, and the copyset keeps
// its data and takes writes.
func TestForgedRaftMessagesAreRefused(t *testing.T) {
	tc := newTestCluster(t, 3, 32, nil)
	id := MakeGroupID(3, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	for k := range 4 {
		tc.writeRetry(id, 1, int64(k)*testBlock, pattern(fmt.Sprintf("a%d|", k), testBlock))
	}
	leader := tc.leader(id)
	lead := leader.e.cfg.NodeID
	var follower *Copyset
	for _, n := range tc.running() {
		if c, err := n.engine.Get(id); err == nil && !c.IsLeader() {
			follower = c
			break
		}
	}
	fid := follower.e.cfg.NodeID
	term := follower.term.Load()
	msg := func(typ raftpb.MessageType, from, to uint64) *raftpb.Message {
		return &raftpb.Message{Type: &typ, From: new(from), To: new(to), Term: new(term)}
	}
	refused := func() (n uint64) {
		for _, nd := range tc.running() {
			n += nd.engine.RefusedMessages()
		}
		return n
	}
	before := refused()

	type forgery struct {
		to *Copyset
		m  *raftpb.Message
	}
	forged := map[string]forgery{}
	hb := msg(raftpb.MsgHeartbeat, lead, fid)
	hb.Commit = new(uint64(1 << 40))
	forged["heartbeat committing past the log"] = forgery{follower, hb}
	app := msg(raftpb.MsgApp, lead, fid)
	app.Index, app.LogTerm = new(uint64(1)), new(term)
	app.Entries = []*raftpb.Entry{{Index: new(uint64(5)), Term: new(term)}}
	forged["append with entries out of order"] = forgery{follower, app}
	resp := msg(raftpb.MsgAppResp, fid, lead)
	resp.Index = new(uint64(1 << 40))
	forged["append answer past the leader's log"] = forgery{leader, resp}
	for name, typ := range map[string]raftpb.MessageType{"proposal": raftpb.MsgProp, "hup": raftpb.MsgHup, "snapshot": raftpb.MsgSnap,
		"storage append": raftpb.MsgStorageAppend} {
		forged["local-only "+name] = struct {
			to *Copyset
			m  *raftpb.Message
		}{follower, msg(typ, lead, fid)}
	}
	forged["addressed to another replica"] = forgery{follower, msg(raftpb.MsgHeartbeat, lead, 99)}
	forged["from nobody"] = forgery{follower, msg(raftpb.MsgHeartbeat, 0, fid)}
	// Term 0 skips Raft's term checks; a transfer vote of term 0 from the
	// leader made every follower that voted for it panic.
	vote0 := msg(raftpb.MsgVote, lead, fid)
	vote0.Term, vote0.Context = new(uint64(0)), []byte(campaignTransfer)
	vote0.Index, vote0.LogTerm = new(uint64(1<<40)), new(uint64(1<<40))
	forged["transfer vote of term 0"] = forgery{follower, vote0}
	// A term near 2^64 overflows at the next campaign, outside any Step.
	huge := msg(raftpb.MsgHeartbeat, lead, fid)
	huge.Term = new(uint64(math.MaxUint64))
	forged["heartbeat of term 2^64-1"] = forgery{follower, huge}
	forged["read index (only leaders take them here)"] = forgery{leader, msg(raftpb.MsgReadIndex, fid, lead)}
	for _, f := range forged {
		f.to.e.HandleRaft(f.m.GetFrom(), uint64(id), f.m)
	}
	// The heartbeat is taken with its commit lowered; the others refused.
	soon.Succeeds(t, 10*time.Second, func() error {
		if got := refused() - before; got < uint64(len(forged)-1) {
			return fmt.Errorf("%d messages refused so far", got)
		}
		return nil
	})

	if got := follower.term.Load(); got != term {
		t.Fatalf("the follower's term moved from %d to %d", term, got)
	}

	// A snapshot from a replica that does not lead is refused before any
	// chunk file is written.
	chunksBefore := follower.store.List()
	snapMsg := msg(raftpb.MsgSnap, 99, fid)
	snapMsg.Snapshot = &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: new(uint64(1 << 30)), Term: new(term)}}
	raw, err := proto.Marshal(snapMsg)
	if err != nil {
		t.Fatal(err)
	}
	header := &transportpb.SnapshotChunk{Group: uint64(id), RaftMessage: raw,
		Files: []*transportpb.SnapshotFile{{ChunkId: 77}}}
	sent := false
	err = follower.e.HandleSnapshot(context.Background(), header, func() (*transportpb.SnapshotChunk, error) {
		sent = true
		return nil, errors.New("the install read past its checks")
	})
	if !errors.Is(err, ErrSnapshotRefused) || sent {
		t.Fatalf("snapshot from a non-leader: %v (data read: %t)", err, sent)
	}
	if got := follower.store.List(); len(got) != len(chunksBefore) {
		t.Fatalf("chunk files %v after a refused snapshot, %v before", got, chunksBefore)
	}

	// Nothing broke: every replica serves, takes writes and holds the same
	// data.
	for _, n := range tc.running() {
		c, err := n.engine.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Broken(); err != nil {
			t.Fatalf("replica on %d broken by a forged message: %v", n.id, err)
		}
	}
	for k := range 4 {
		tc.writeRetry(id, 1, int64(4+k)*testBlock, pattern(fmt.Sprintf("b%d|", k), testBlock))
	}
	tc.replicasConverge(id, []uint64{1})
}

// FuzzRaftMessagesNeverBreakAReplica feeds arbitrary Raft messages, as the
// transport decodes them, to the replicas of a three-member copyset: none
// may break a replica or the process. (go test runs the seeds; go test
// -fuzz explores.)
func FuzzRaftMessagesNeverBreakAReplica(f *testing.F) {
	seed := func(m *raftpb.Message) {
		b, err := proto.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint8(0))
	}
	for _, typ := range []raftpb.MessageType{raftpb.MsgHeartbeat, raftpb.MsgApp, raftpb.MsgAppResp, raftpb.MsgVote,
		raftpb.MsgSnap, raftpb.MsgTimeoutNow, raftpb.MsgReadIndex} {
		seed(&raftpb.Message{Type: &typ, From: new(uint64(2)), To: new(uint64(1)), Term: new(uint64(1)),
			Commit: new(uint64(1 << 40)), Index: new(uint64(1 << 40)), LogTerm: new(uint64(1)),
			Entries: []*raftpb.Entry{{Index: new(uint64(3)), Term: new(uint64(9))}}})
	}
	for _, term := range []uint64{0, math.MaxUint64} {
		typ := raftpb.MsgVote
		seed(&raftpb.Message{Type: &typ, From: new(uint64(2)), To: new(uint64(1)), Term: new(term), Context: []byte(campaignTransfer),
			Index: new(uint64(1 << 40)), LogTerm: new(uint64(1 << 40))})
	}
	tc := newTestCluster(f, 3, 16, nil)
	id := MakeGroupID(4, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	tc.writeRetry(id, 1, 0, pattern("fuzz|", testBlock))
	f.Fuzz(func(t *testing.T, raw []byte, target uint8) {
		m := &raftpb.Message{}
		if proto.Unmarshal(raw, m) != nil {
			return
		}
		n := tc.node(uint64(target%3) + 1)
		c, err := n.engine.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		// The transport addresses every message to its own node.
		m.To = new(n.id)
		n.engine.HandleRaft(m.GetFrom(), uint64(id), m)
		if err := c.callQuietWait(context.Background(), func() {}); err != nil {
			t.Fatal(err)
		}
		if err := c.Broken(); err != nil {
			t.Fatalf("a %s broke the replica on %d: %v", m.GetType(), n.id, err)
		}
	})
}
