package transportpb_test

import (
	"bytes"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"

	"cairn.io/cairn/api/transportpb"
)

// bytesSchema returns RaftBatch as declared when GroupMessage.message was a
// bytes field holding the raftpb.Message's encoding.
func bytesSchema(t *testing.T) protoreflect.MessageDescriptor {
	t.Helper()
	fdp := protodesc.ToFileDescriptorProto(transportpb.File_transportpb_transport_proto)
	fdp.Dependency = nil
	found := false
	for _, m := range fdp.GetMessageType() {
		if m.GetName() != "GroupMessage" {
			continue
		}
		for _, f := range m.GetField() {
			if f.GetNumber() == 2 {
				f.Type, f.TypeName = descriptorpb.FieldDescriptorProto_TYPE_BYTES.Enum(), nil
				found = true
			}
		}
	}
	if !found {
		t.Fatal("GroupMessage has no field 2")
	}
	fd, err := protodesc.NewFile(fdp, new(protoregistry.Files))
	if err != nil {
		t.Fatalf("build the bytes schema: %v", err)
	}
	return fd.Messages().ByName("RaftBatch")
}

// raftMessages are messages of the kinds the transport carries, an empty
// one among them.
func raftMessages() []*raftpb.Message {
	app, resp, vote, empty := raftpb.MsgApp, raftpb.MsgAppResp, raftpb.MsgVote, raftpb.MsgHup
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	norm := raftpb.EntryNormal
	return []*raftpb.Message{
		{Type: &app, To: new(uint64(2)), From: new(uint64(1)), Term: new(uint64(5)), LogTerm: new(uint64(4)),
			Index: new(uint64(99)), Commit: new(uint64(98)), Entries: []*raftpb.Entry{
				{Term: new(uint64(5)), Index: new(uint64(100)), Type: &norm, Data: data},
				{Term: new(uint64(5)), Index: new(uint64(101)), Data: []byte("x")},
				{Term: new(uint64(5)), Index: new(uint64(102))},
			}},
		{Type: &resp, To: new(uint64(1)), From: new(uint64(2)), Term: new(uint64(5)), Index: new(uint64(102)),
			Reject: new(true), RejectHint: new(uint64(7))},
		{Type: &vote, To: new(uint64(3)), From: new(uint64(1)), Term: new(uint64(6)), Context: []byte("transfer")},
		{Type: &empty},
		{},
	}
}

// TestGroupMessageIsWireCompatible checks that a batch encoded with the
// Raft messages as bytes decodes into GroupMessage's raftpb.Message, and the
// reverse: chunkservers on either side of the change understand each other.
func TestGroupMessageIsWireCompatible(t *testing.T) {
	oldBatch := bytesSchema(t)
	oldGroup := oldBatch.Fields().ByName("messages").Message()
	msgs := raftMessages()

	t.Run("bytes to message", func(t *testing.T) {
		b := dynamicpb.NewMessage(oldBatch)
		b.Set(oldBatch.Fields().ByName("from"), protoreflect.ValueOfUint64(1))
		b.Set(oldBatch.Fields().ByName("to"), protoreflect.ValueOfUint64(2))
		list := b.Mutable(oldBatch.Fields().ByName("messages")).List()
		for i, m := range msgs {
			raw, err := proto.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			g := dynamicpb.NewMessage(oldGroup)
			g.Set(oldGroup.Fields().ByName("group"), protoreflect.ValueOfUint64(uint64(i)+7))
			g.Set(oldGroup.Fields().ByName("message"), protoreflect.ValueOfBytes(raw))
			list.Append(protoreflect.ValueOfMessage(g))
		}
		wire, err := proto.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		var got transportpb.RaftBatch
		if err := proto.Unmarshal(wire, &got); err != nil {
			t.Fatalf("decode a batch of encoded messages: %v", err)
		}
		if got.GetFrom() != 1 || got.GetTo() != 2 || len(got.GetMessages()) != len(msgs) {
			t.Fatalf("decoded from %d to %d with %d messages, want 1, 2, %d", got.GetFrom(), got.GetTo(), len(got.GetMessages()), len(msgs))
		}
		for i, gm := range got.GetMessages() {
			m := gm.GetMessage()
			if m == nil {
				// proto3 leaves an empty bytes field out.
				m = &raftpb.Message{}
			}
			if gm.GetGroup() != uint64(i)+7 || !proto.Equal(m, msgs[i]) {
				t.Errorf("message %d (%v): group %d, want %d, or the message differs", i, msgs[i].GetType(), gm.GetGroup(), i+7)
			}
		}
	})

	t.Run("message to bytes", func(t *testing.T) {
		b := &transportpb.RaftBatch{From: 1, To: 2}
		for i, m := range msgs {
			b.Messages = append(b.Messages, &transportpb.GroupMessage{Group: uint64(i) + 7, Message: m})
		}
		wire, err := proto.MarshalOptions{}.MarshalAppend(nil, b)
		if err != nil {
			t.Fatal(err)
		}
		got := dynamicpb.NewMessage(oldBatch)
		if err := proto.Unmarshal(wire, got); err != nil {
			t.Fatalf("decode a batch of messages with bytes fields: %v", err)
		}
		list := got.Get(oldBatch.Fields().ByName("messages")).List()
		if list.Len() != len(msgs) {
			t.Fatalf("%d messages decoded, want %d", list.Len(), len(msgs))
		}
		for i := range list.Len() {
			g := list.Get(i).Message()
			raw := g.Get(oldGroup.Fields().ByName("message")).Bytes()
			want, err := proto.Marshal(msgs[i])
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(raw, want) {
				t.Errorf("message %d: %d bytes, want the message's %d-byte encoding", i, len(raw), len(want))
			}
			var m raftpb.Message
			if err := proto.Unmarshal(raw, &m); err != nil {
				t.Fatalf("message %d: decode: %v", i, err)
			}
			if group := g.Get(oldGroup.Fields().ByName("group")).Uint(); group != uint64(i)+7 || !proto.Equal(&m, msgs[i]) {
				t.Errorf("message %d (%v): group %d, want %d, or the message differs", i, msgs[i].GetType(), group, i+7)
			}
		}
	})
}

// TestRaftMessageTypeResolves: the schema names raft's own file as raft's
// generated code registers it, so the field's type is the real
// raftpb.Message in the registry, not a placeholder.
func TestRaftMessageTypeResolves(t *testing.T) {
	fd := transportpb.File_transportpb_transport_proto
	for i := 0; i < fd.Imports().Len(); i++ {
		if imp := fd.Imports().Get(i); imp.IsPlaceholder() {
			t.Errorf("import %s does not resolve to a registered file", imp.Path())
		}
	}
	if md := fd.Messages().ByName("GroupMessage").Fields().ByName("message").Message(); md.IsPlaceholder() || md.FullName() != "raftpb.Message" {
		t.Errorf("GroupMessage.message is %s (placeholder %v)", md.FullName(), md.IsPlaceholder())
	}
}
