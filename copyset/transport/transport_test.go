package transport

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/internal/wire"
)

type addrs map[uint64]string

func (a addrs) Resolve(_ context.Context, id uint64) (string, error) {
	if s, ok := a[id]; ok {
		return s, nil
	}
	return "", fmt.Errorf("no address for %d", id)
}

type received struct {
	from, group uint64
	m           *raftpb.Message
}

type collector struct {
	mu  sync.Mutex
	got []received
}

func (c *collector) HandleRaft(from, group uint64, m *raftpb.Message) {
	c.mu.Lock()
	c.got = append(c.got, received{from, group, m})
	c.mu.Unlock()
}

func (c *collector) HandleSnapshot(context.Context, *transportpb.SnapshotChunk, func() (*transportpb.SnapshotChunk, error)) error {
	return nil
}

func (c *collector) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.got)
}

// serve runs tr's receiving side on lis (a gRPC server for snapshots, a
// wire server for Raft batches, frames of at most maxFrame bytes when it is
// positive) until stop.
func serve(tr *Transport, lis net.Listener, maxFrame int) (stop func()) {
	srv, wsrv := grpc.NewServer(), wire.NewServer(wire.ServerOptions{MaxFrame: maxFrame})
	tr.Register(srv, wsrv)
	wire.ServeSplit(lis, wsrv, srv)
	return func() { srv.Stop(); _ = wsrv.Close() }
}

// pair starts two transports (nodes 1 and 2) on loopback.
func pair(t *testing.T, faults *Faults) (*Transport, *collector, *Transport) {
	t.Helper()
	a := addrs{}
	var trs []*Transport
	var cols []*collector
	for id := uint64(1); id <= 2; id++ {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a[id] = lis.Addr().String()
		col := &collector{}
		tr := New(Config{NodeID: id, Resolver: a, Handler: col, Faults: faults})
		stop := serve(tr, lis, 0)
		t.Cleanup(func() { tr.Close(); stop() })
		trs, cols = append(trs, tr), append(cols, col)
	}
	return trs[0], cols[1], trs[1]
}

func waitCount(t *testing.T, c *collector, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for c.count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("received %d messages, want %d", c.count(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func msg(typ raftpb.MessageType, to, from, term, commit uint64, ctx []byte) *raftpb.Message {
	return &raftpb.Message{Type: &typ, To: &to, From: &from, Term: &term, Commit: &commit, Context: ctx}
}

// TestHeartbeatsTravelCoalesced sends heartbeats of many copysets and checks
// that they cross as compact heartbeat entries, not Raft messages, and
// arrive with every field intact.
func TestHeartbeatsTravelCoalesced(t *testing.T) {
	tr1, col2, _ := pair(t, nil)
	const groups = 300
	for g := uint64(1); g <= groups; g++ {
		typ := raftpb.MsgHeartbeat
		if g%2 == 0 {
			typ = raftpb.MsgHeartbeatResp
		}
		tr1.Send(g, msg(typ, 2, 1, 7, g*10, []byte{byte(g)}))
	}
	app := msg(raftpb.MsgApp, 2, 1, 7, 5, nil)
	app.Entries = []*raftpb.Entry{{Index: new(uint64(6)), Term: new(uint64(7)), Data: []byte("payload")}}
	tr1.Send(999, app)
	waitCount(t, col2, groups+1)
	// The sender counts a batch once its write returned, which may be
	// after the receiver handled it.
	st := tr1.Stats()
	for deadline := time.Now().Add(10 * time.Second); st.HeartbeatsSent < groups && time.Now().Before(deadline); st = tr1.Stats() {
		time.Sleep(5 * time.Millisecond)
	}
	if st.HeartbeatsSent != groups || st.MessagesSent != 1 {
		t.Fatalf("sent %d heartbeats and %d messages, want %d and 1", st.HeartbeatsSent, st.MessagesSent, groups)
	}
	if st.BatchesSent >= groups {
		t.Fatalf("%d batches for %d heartbeats: nothing was coalesced", st.BatchesSent, groups)
	}
	col2.mu.Lock()
	defer col2.mu.Unlock()
	for _, r := range col2.got {
		m := r.m
		if r.from != 1 || m.GetFrom() != 1 || m.GetTo() != 2 || m.GetTerm() != 7 {
			t.Fatalf("message of group %d arrived as %v", r.group, m)
		}
		switch r.group {
		case 999:
			if m.GetType() != raftpb.MsgApp || string(m.GetEntries()[0].GetData()) != "payload" {
				t.Fatalf("MsgApp arrived as %v", m)
			}
		default:
			want := raftpb.MsgHeartbeat
			if r.group%2 == 0 {
				want = raftpb.MsgHeartbeatResp
			}
			if m.GetType() != want || len(m.GetContext()) != 1 || m.GetContext()[0] != byte(r.group) {
				t.Fatalf("heartbeat of group %d arrived as %v", r.group, m)
			}
			if want == raftpb.MsgHeartbeat && m.GetCommit() != r.group*10 {
				t.Fatalf("heartbeat of group %d carries commit %d", r.group, m.GetCommit())
			}
		}
	}
}

func TestPartitionDropsBothWays(t *testing.T) {
	f := NewFaults(3)
	tr1, col2, tr2 := pair(t, f)
	f.Partition(1, 2)
	for g := uint64(1); g <= 50; g++ {
		if tr1.Send(g, msg(raftpb.MsgHeartbeat, 2, 1, 1, 0, nil)) {
			t.Fatal("a message crossed a partition")
		}
		if tr2.Send(g, msg(raftpb.MsgHeartbeat, 1, 2, 1, 0, nil)) {
			t.Fatal("a message crossed a partition")
		}
	}
	f.Heal()
	tr1.Send(1, msg(raftpb.MsgHeartbeat, 2, 1, 1, 0, nil))
	waitCount(t, col2, 1)
	if n := col2.count(); n != 1 {
		t.Fatalf("%d messages arrived, want only the one sent after healing", n)
	}
}

func TestDropAndDuplicateRates(t *testing.T) {
	f := NewFaults(9)
	tr1, col2, _ := pair(t, f)
	f.SetRates(0.3, 0.3, 0, 0)
	sent := 0
	for g := uint64(1); g <= 1000; g++ {
		if tr1.Send(g, msg(raftpb.MsgHeartbeat, 2, 1, 1, 0, nil)) {
			sent++
		}
	}
	// Dropped messages are reported as not sent; duplicates arrive twice.
	if sent < 600 || sent > 800 {
		t.Fatalf("%d of 1000 sent with a 30%% drop rate", sent)
	}
	waitCount(t, col2, sent+1) // more arrive than were sent
}

func TestBatchForAnotherNodeIsRefused(t *testing.T) {
	// Node 1 believes node 2's address belongs to node 3.
	a := addrs{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	col := &collector{}
	real := New(Config{NodeID: 2, Resolver: a, Handler: col})
	defer serve(real, lis, 0)()
	a[3] = lis.Addr().String()
	wrong := New(Config{NodeID: 1, Resolver: a, Handler: &collector{}})
	defer wrong.Close()
	wrong.Send(1, msg(raftpb.MsgHeartbeat, 3, 1, 1, 0, nil))
	time.Sleep(300 * time.Millisecond)
	if col.count() != 0 {
		t.Fatal("a batch addressed to node 3 was delivered on node 2")
	}
}

// TestLargeAppendBurstFitsReceiveLimit queues a burst of large appends for
// a peer whose wire server accepts at most 2 MiB per frame, as a
// chunkserver's does for its largest IO plus a margin: the burst must cross
// in frames under the limit, with nothing dropped and every byte intact.
func TestLargeAppendBurstFitsReceiveLimit(t *testing.T) {
	a := addrs{}
	col := &collector{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a[2] = lis.Addr().String()
	rx := New(Config{NodeID: 2, Resolver: a, Handler: col})
	stop := serve(rx, lis, 2<<20)
	t.Cleanup(func() { rx.Close(); stop() })
	tx := New(Config{NodeID: 1, Resolver: a, Handler: &collector{}})
	t.Cleanup(func() { tx.Close() })

	const n, size = 24, 512 << 10
	var sent, before []*raftpb.Message
	for i := range uint64(n) {
		app := msg(raftpb.MsgApp, 2, 1, 3, i, nil)
		data := make([]byte, size)
		for j := range data {
			data[j] = byte(i + uint64(j))
		}
		app.Entries = []*raftpb.Entry{{Index: new(i + 1), Term: new(uint64(3)), Data: data}}
		sent, before = append(sent, app), append(before, proto.Clone(app).(*raftpb.Message))
		if !tx.Send(i%4+1, app) {
			t.Fatalf("append %d not queued", i)
		}
		tx.Send(i%4+1, msg(raftpb.MsgHeartbeat, 2, 1, 3, i, nil))
	}
	waitCount(t, col, 2*n)
	if st := tx.Stats(); st.Dropped != 0 {
		t.Fatalf("%d messages dropped", st.Dropped)
	}
	// Raft keeps the entries it sends: sending must leave them as they were.
	for i := range sent {
		if !proto.Equal(sent[i], before[i]) {
			t.Fatalf("append %d changed by sending it", i)
		}
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	next := uint64(0)
	for _, r := range col.got {
		if r.m.GetType() != raftpb.MsgApp {
			continue
		}
		en := r.m.Entries[0]
		if en.GetIndex() != next+1 {
			t.Fatalf("append with index %d arrived after %d", en.GetIndex(), next)
		}
		for j, b := range en.Data {
			if b != byte(next+uint64(j)) {
				t.Fatalf("append %d: byte %d corrupted", next, j)
			}
		}
		next++
	}
	if next != n {
		t.Fatalf("%d appends arrived, want %d", next, n)
	}
}

// TestReceivedMessagesOwnTheirBytes checks that the messages a batch
// delivers do not share memory with the frame they arrived in, which the
// wire server reuses for the next frame.
func TestReceivedMessagesOwnTheirBytes(t *testing.T) {
	col := &collector{}
	tr := New(Config{NodeID: 2, Handler: col})
	defer tr.Close()
	app := msg(raftpb.MsgApp, 2, 1, 3, 1, []byte("context"))
	data := bytes.Repeat([]byte("entry"), 1000)
	app.Entries = []*raftpb.Entry{{Index: new(uint64(2)), Term: new(uint64(3)), Data: data}}
	want := proto.Clone(app).(*raftpb.Message)
	payload, err := proto.Marshal(&transportpb.RaftBatch{From: 1, To: 2, Messages: []*transportpb.GroupMessage{{Group: 7, Message: app}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.receive(context.Background(), payload); err != nil {
		t.Fatal(err)
	}
	for i := range payload {
		payload[i] = 0xff
	}
	if len(col.got) != 1 {
		t.Fatalf("%d messages delivered, want 1", len(col.got))
	}
	if r := col.got[0]; r.from != 1 || r.group != 7 || !proto.Equal(r.m, want) {
		t.Fatalf("delivered from %d, group %d, %d entries; want the append from 1 to group 7, unchanged after its frame was overwritten",
			r.from, r.group, len(r.m.GetEntries()))
	}
}

// stallingHandler holds every append until released, as a receiver busy
// with a backlog of large appends would, and counts the rest.
type stallingHandler struct {
	collector
	release chan struct{}
}

func (h *stallingHandler) HandleRaft(from, group uint64, m *raftpb.Message) {
	if m.GetType() == raftpb.MsgApp {
		<-h.release
	}
	h.collector.HandleRaft(from, group, m)
}

// stalledPeer starts a receiver (node 2) on lis whose handler holds every
// append until release is called (also at cleanup), and a sender (node 1).
func stalledPeer(t *testing.T, lis net.Listener) (tx *Transport, h *stallingHandler, release func()) {
	t.Helper()
	a := addrs{2: lis.Addr().String()}
	h = &stallingHandler{release: make(chan struct{})}
	rx := New(Config{NodeID: 2, Resolver: a, Handler: h})
	stop := serve(rx, lis, 0)
	t.Cleanup(func() { stop(); rx.Close() })
	tx = New(Config{NodeID: 1, Resolver: a, Handler: &collector{}})
	t.Cleanup(func() { tx.Close() })
	var once sync.Once
	release = func() { once.Do(func() { close(h.release) }) }
	t.Cleanup(release)
	return tx, h, release
}

// TestControlTrafficOvertakesStalledAppends checks that heartbeats and votes
// reach a peer while appends to it are stuck.
func TestControlTrafficOvertakesStalledAppends(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tx, h, release := stalledPeer(t, lis)

	app := msg(raftpb.MsgApp, 2, 1, 3, 1, nil)
	app.Entries = []*raftpb.Entry{{Index: new(uint64(2)), Term: new(uint64(3)), Data: make([]byte, 64<<10)}}
	tx.Send(1, app)
	for g := uint64(1); g <= 10; g++ {
		tx.Send(g, msg(raftpb.MsgHeartbeat, 2, 1, 3, 1, nil))
		tx.Send(g, msg(raftpb.MsgHeartbeatResp, 2, 1, 3, 1, nil))
		tx.Send(g, msg(raftpb.MsgPreVote, 2, 1, 4, 0, nil))
	}
	waitCount(t, &h.collector, 30)
	release()
	waitCount(t, &h.collector, 31)
}

// FuzzReceive feeds arbitrary bytes to the receiving side of the Raft
// transport, as a peer's wire connection would: nothing panics, a batch
// for another chunkserver is refused, and every message handed on is
// addressed to this chunkserver from the batch's sender (the copyset
// package fuzzes what Raft then does with them).
func FuzzReceive(f *testing.F) {
	hb := &transportpb.RaftBatch{From: 2, To: 1, Heartbeats: []*transportpb.Heartbeat{{Group: 7, Term: 3, Commit: 1 << 40}}}
	typ := raftpb.MsgApp
	app := &raftpb.Message{Type: &typ, From: new(uint64(2)), To: new(uint64(1)), Term: new(uint64(3))}
	for _, b := range []*transportpb.RaftBatch{hb, {From: 2, To: 1, Messages: []*transportpb.GroupMessage{{Group: 7, Message: app}}}, {From: 2, To: 9}} {
		raw, _ := proto.Marshal(b)
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		got := &collector{}
		tr := New(Config{NodeID: 1, Handler: got})
		err := tr.receive(context.Background(), raw)
		var b transportpb.RaftBatch
		if proto.Unmarshal(raw, &b) == nil && b.GetTo() != 1 && err == nil {
			t.Fatalf("a batch for chunkserver %d was taken", b.GetTo())
		}
		for _, r := range got.got {
			if r.from != b.GetFrom() {
				t.Fatalf("message from %d handed on as from %d", b.GetFrom(), r.from)
			}
		}
	})
}
