package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"go.etcd.io/raft/v3/raftpb"

	"cairn.io/cairn/api/transportpb"
)

// TestMemoryDeliversCopies: a message reaches its receiver at once, as a
// copy (the sender may reuse what it sent), from the right sender and
// copyset; a message to a node that left or is partitioned away is dropped
// and reported unreachable.
func TestMemoryDeliversCopies(t *testing.T) {
	nw := NewNetwork()
	faults := NewFaults(1)
	var mu sync.Mutex
	var unreachable []string
	a := nw.Join(Config{NodeID: 1, Handler: &collector{}, Faults: faults, OnUnreachable: func(to uint64, groups []uint64) {
		mu.Lock()
		unreachable = append(unreachable, fmt.Sprint(to, groups))
		mu.Unlock()
	}})
	got := &collector{}
	b := nw.Join(Config{NodeID: 2, Handler: got, Faults: faults})
	if a.Send(9, msg(raftpb.MsgHeartbeat, 2, 1, 3, 7, nil)) {
		t.Fatal("a message reached a node before it registered")
	}
	a.Register(nil, nil)
	b.Register(nil, nil)

	m := msg(raftpb.MsgApp, 2, 1, 3, 7, []byte("ctx"))
	m.Entries = []*raftpb.Entry{{Data: []byte("payload")}}
	if !a.Send(9, m) {
		t.Fatal("send to a live peer reported dropped")
	}
	m.Entries[0].Data[0] = 'X' // the sender reuses its buffer
	if got.count() != 1 {
		t.Fatalf("received %d messages, want 1", got.count())
	}
	r := got.got[0]
	if r.from != 1 || r.group != 9 || !bytes.Equal(r.m.Entries[0].Data, []byte("payload")) || r.m.GetCommit() != 7 {
		t.Fatalf("received %+v (data %q)", r, r.m.Entries[0].Data)
	}

	faults.Partition(1, 2)
	if a.Send(9, msg(raftpb.MsgHeartbeat, 2, 1, 3, 7, nil)) {
		t.Fatal("a message across a partition was delivered")
	}
	faults.Heal()
	b.Close()
	if a.Send(4, msg(raftpb.MsgHeartbeat, 2, 1, 3, 7, nil)) {
		t.Fatal("a message to a node that left was delivered")
	}
	if got.count() != 1 {
		t.Fatalf("received %d messages, want 1", got.count())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(unreachable) != 2 || unreachable[1] != "2 [4]" {
		t.Fatalf("unreachable reports %q, want [\"2 [9]\" \"2 [4]\"]", unreachable)
	}
	if st := a.Stats(); st.MessagesSent != 1 || st.Dropped != 2 {
		t.Fatalf("sender stats %+v", st)
	}
}

// snapshotReceiver records the frames of snapshot transfers, or refuses
// them after the header.
type snapshotReceiver struct {
	collector
	refuse error
	frames [][]byte
}

func (s *snapshotReceiver) HandleSnapshot(_ context.Context, header *transportpb.SnapshotChunk, next func() (*transportpb.SnapshotChunk, error)) error {
	if s.refuse != nil {
		return s.refuse
	}
	s.frames = append(s.frames, header.GetData())
	for {
		c, err := next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		s.frames = append(s.frames, c.GetData())
	}
}

// TestMemorySnapshotTransfers: frames arrive in order and as copies; a
// receiver's refusal reaches the sender, whether it comes before the
// sender has finished sending or after.
func TestMemorySnapshotTransfers(t *testing.T) {
	nw := NewNetwork()
	a := nw.Join(Config{NodeID: 1, Handler: &collector{}})
	recv := &snapshotReceiver{}
	nw.Join(Config{NodeID: 2, Handler: recv}).Register(nil, nil)

	s, err := a.OpenSnapshot(context.Background(), 2)
	if err != nil {
		t.Fatal(err)
	}
	buf := []byte("header")
	if err := s.Send(&transportpb.SnapshotChunk{Data: buf}); err != nil {
		t.Fatal(err)
	}
	copy(buf, "HEADER")
	if err := s.Send(&transportpb.SnapshotChunk{Data: []byte("piece")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Finish(); err != nil {
		t.Fatalf("finish: %v", err)
	}
	if got := fmt.Sprintf("%q", recv.frames); got != `["header" "piece"]` {
		t.Fatalf("frames received: %s", got)
	}

	recv.refuse = errors.New("not your leader")
	s, err = a.OpenSnapshot(context.Background(), 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&transportpb.SnapshotChunk{Data: []byte("header")}); err != nil {
		t.Fatal(err)
	}
	// The receiver has refused: later frames fail rather than block.
	for i := 0; i < 3; i++ {
		if err := s.Send(&transportpb.SnapshotChunk{Data: []byte("piece")}); err != nil {
			break
		}
	}
	if err := s.Finish(); err == nil {
		t.Fatal("a refused snapshot finished without an error")
	}

	if _, err := a.OpenSnapshot(context.Background(), 3); err == nil || !strings.Contains(err.Error(), "chunkserver 3") {
		t.Fatalf("snapshot to a node not on the network: %v", err)
	}
}
