package copyset

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/internal/soon"
)

func TestDedupTableSkipsRepeatsAndForgetsAnswered(t *testing.T) {
	tb := newDedupTable()
	r := ClientRequest{Client: 7, Seq: 3, Low: 1}
	tb.advance(r, 10)
	if tb.applied(r) {
		t.Fatal("a new request counts as applied")
	}
	tb.record(r)
	if !tb.applied(r) {
		t.Fatal("a recorded request does not count as applied")
	}
	// The same request retried with a newer low-water mark: still a repeat.
	r2 := ClientRequest{Client: 7, Seq: 3, Low: 2}
	tb.advance(r2, 12)
	if !tb.applied(r2) {
		t.Fatal("a retry is not recognised")
	}
	// Once the client says everything below 5 returned, a late attempt of
	// 4 (never applied) is not applied either, and 3 is forgotten.
	tb.advance(ClientRequest{Client: 7, Seq: 6, Low: 5}, 13)
	if !tb.applied(ClientRequest{Client: 7, Seq: 4, Low: 1}) {
		t.Fatal("a request the client was answered for can still be applied")
	}
	if n := len(tb.clients[7].applied); n != 0 {
		t.Fatalf("%d requests below the low-water mark kept", n)
	}
	// Other clients and requests without a client are independent.
	if tb.applied(ClientRequest{Client: 8, Seq: 3}) || tb.applied(ClientRequest{}) {
		t.Fatal("another client's request counts as applied")
	}
	got, err := decodeDedupTable(tb.encode())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.encode(), tb.encode()) {
		t.Fatal("encode/decode round trip differs")
	}
}

func TestDedupTableEvictsTheLongestIdleClient(t *testing.T) {
	tb := newDedupTable()
	for c := uint64(1); c <= maxDedupClients; c++ {
		tb.advance(ClientRequest{Client: c, Seq: 1, Low: 1}, c+100)
	}
	tb.advance(ClientRequest{Client: 1, Seq: 2, Low: 1}, 1_000_000) // client 1 active again
	tb.advance(ClientRequest{Client: 99999, Seq: 1, Low: 1}, 1_000_001)
	if len(tb.clients) != maxDedupClients {
		t.Fatalf("%d clients kept, bound %d", len(tb.clients), maxDedupClients)
	}
	if tb.clients[2] != nil || tb.clients[1] == nil {
		t.Fatal("evicted a client other than the longest idle one")
	}
}

func FuzzDecodeDedupTable(f *testing.F) {
	tb := newDedupTable()
	tb.advance(ClientRequest{Client: 5, Seq: 9, Low: 2}, 3)
	tb.record(ClientRequest{Client: 5, Seq: 9, Low: 2})
	f.Add(tb.encode())
	f.Add([]byte{1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeDedupTable(b)
		if err != nil {
			return
		}
		if len(b) > 0 && !bytes.Equal(got.encode(), b) && len(got.clients) > 0 {
			// Equal tables encode equally; sets of seqs decode in any order.
			again, err := decodeDedupTable(got.encode())
			if err != nil || !bytes.Equal(again.encode(), got.encode()) {
				t.Fatal("decoded table does not round trip")
			}
		}
	})
}

// TestRetriedWriteIsAppliedOnce: a write proposed twice with the same client
// request (a retry after its leader died before answering) takes effect
// once, even when another write to the same block came between. Every
// replica skips the repeat, also one that restarted from its checkpoint and
// one that caught up by a snapshot.
func TestRetriedWriteIsAppliedOnce(t *testing.T) {
	tc := newTestCluster(t, 3, 32, func(c *Config) {
		c.RetainBytes = 8 << 10 // so that a lagging follower needs a snapshot
	})
	id := MakeGroupID(8, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	first := ClientRequest{Client: 41, Seq: 7, Low: 7}
	propose := func(req ClientRequest, tag string) {
		t.Helper()
		soon.Succeeds(t, 30*time.Second, func() error {
			c := tc.leader(id)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			p, err := c.ProposeWrite(ctx, nil, req, 1, 1, 1, 0, pattern(tag, testBlock))
			if err != nil {
				return err
			}
			_, err = p.Wait(ctx)
			return err
		})
	}
	propose(first, "X|")
	propose(ClientRequest{Client: 42, Seq: 1, Low: 1}, "Y|") // another client's later write
	propose(first, "X|")                                     // the retry
	if got := tc.readRetry(id, 1, 0, testBlock); !bytes.Equal(got, pattern("Y|", testBlock)) {
		t.Fatalf("block holds %.8q after the retry; want the later write Y", got)
	}
	// A replica stopped now misses the rest and catches up by snapshot
	// (its peers compact their logs); the others restart from disk.
	follower := uint64(1)
	if tc.leader(id).e.cfg.NodeID == follower {
		follower = 2
	}
	tc.stop(follower, false, 0)
	for k := range 40 {
		tc.writeRetry(id, 2, int64(k%8)*testBlock, pattern("fill|", testBlock))
	}
	// Once the leader no longer counts the follower active, a checkpoint
	// compacts past it.
	soon.Succeeds(t, 30*time.Second, func() error {
		st, err := tc.leader(id).Status(context.Background())
		if err != nil {
			return err
		}
		for _, p := range st.Progress {
			if p.Node == follower && p.RecentActive {
				return fmt.Errorf("follower %d still counted active", follower)
			}
		}
		for _, n := range tc.running() {
			c, _ := n.engine.Get(id)
			c.requestCheckpoint()
		}
		return nil
	})
	soon.Succeeds(t, 30*time.Second, func() error {
		st, err := tc.leader(id).Status(context.Background())
		if err != nil {
			return err
		}
		if st.FirstIndex < 20 {
			return fmt.Errorf("leader's log still starts at %d", st.FirstIndex)
		}
		return nil
	})
	tc.start(follower)
	tc.replicasConverge(id, []uint64{1, 2})
	for _, n := range tc.running() {
		if n.id != follower {
			tc.stop(n.id, false, 0)
			tc.start(n.id)
		}
	}
	propose(first, "X|") // again, long after
	tc.replicasConverge(id, []uint64{1, 2})
	if got := tc.readRetry(id, 1, 0, testBlock); !bytes.Equal(got, pattern("Y|", testBlock)) {
		t.Fatalf("block holds %.8q after restarts and a snapshot; want Y", got)
	}
}

// TestEntriesAnInstallHeldAreRecordedAsApplied: entries at or below an
// installed snapshot's index are not written again (the chunk files hold
// them), but their requests go into the table of applied requests. Raft may
// not adopt an install (a newer leader caught the replica up by appends
// meanwhile), and then the snapshot's own table never replaces this
// replica's: a retry of such a request must still be skipped here.
func TestEntriesAnInstallHeldAreRecordedAsApplied(t *testing.T) {
	tc := newTestCluster(t, 3, 32, nil)
	id := MakeGroupID(8, 2)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	tc.writeRetry(id, 1, 0, pattern("a|", testBlock))
	c := tc.leader(id)
	req := ClientRequest{Client: 43, Seq: 5, Low: 5}
	data := (&command{op: opWrite, chunk: 1, req: req, data: pattern("held|", testBlock)}).encode()

	c.smMu.Lock()
	defer c.smMu.Unlock()
	applied, appliedTerm, installed := c.sm.applied, c.sm.appliedTerm, c.sm.installed
	defer func() { // the test's entry is not the log's: put the replica back
		c.sm.applied, c.sm.appliedTerm, c.sm.installed = applied, appliedTerm, installed
		c.applied.Store(applied)
	}()
	c.sm.installed = applied + 1
	typ := raftpb.EntryNormal
	en := &raftpb.Entry{Type: &typ, Index: new(applied + 1), Term: new(appliedTerm), Data: data}
	if _, err := c.applyEntries([]*raftpb.Entry{en}); err != nil {
		t.Fatal(err)
	}
	if !c.sm.dedup.applied(req) {
		t.Fatal("a request of an entry the install held is not recorded as applied: a retry would be written again on this replica only")
	}
}
