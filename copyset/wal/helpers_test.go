package wal

import (
	"testing"

	"go.etcd.io/raft/v3/raftpb"
)

func FuzzDecodeRecord(f *testing.F) {
	f.Add(appendRecord(nil, 1, recEntries, 3, appendEntriesPayload(nil, []*raftpb.Entry{ent(1, 1, "abc")})), uint64(1))
	f.Add(appendRecord(nil, 9, recHardState, 3, appendHardStatePayload(nil, hs(1, 2, 3))), uint64(9))
	f.Add([]byte{}, uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, seq uint64) {
		rec, size, ok := decodeRecord(data, seq)
		if !ok {
			return
		}
		if size > len(data) || size < recordHeaderSize {
			t.Fatalf("size %d for %d bytes", size, len(data))
		}
		switch rec.typ {
		case recEntries:
			_, _ = decodeEntries(rec.payload)
		case recHardState:
			_, _ = decodeHardState(rec.payload)
		case recSnapshot, recSnapshotEpoch:
			_, _ = decodeSnapshot(rec.typ, rec.payload)
		}
	})
}

func FuzzDecodeEntries(f *testing.F) {
	f.Add(appendEntriesPayload(nil, []*raftpb.Entry{ent(1, 1, "abc"), ent(2, 1, "")}))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		ents, err := decodeEntries(data)
		if err != nil {
			return
		}
		// Whatever decodes must encode back to the same bytes.
		if got := appendEntriesPayload(nil, ents); string(got) != string(data[:len(got)]) {
			t.Fatalf("round trip differs")
		}
	})
}
