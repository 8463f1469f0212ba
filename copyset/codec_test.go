package copyset

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"go.etcd.io/raft/v3/raftpb"
)

func TestCommandRoundTrip(t *testing.T) {
	for _, c := range []command{
		{op: opWrite, proposer: 3, id: 9, chunk: 7, volume: 2, epoch: 5, offset: 4096, data: []byte("hello")},
		{op: opWrite, proposer: 1, id: 1, chunk: 1, volume: 1, epoch: 1, req: ClientRequest{Client: 77, Seq: 12, Low: 10}, data: []byte("x")},
		{op: opDelete, proposer: 2, id: 3, chunk: 4, volume: 5, epoch: 6, data: []byte{}},
		{op: opDelete, chunk: 4, req: ClientRequest{Client: 1, Seq: 2, Low: 2}, data: []byte{}},
		{op: opWrite, chunk: 8, seq: Seq{SN: 5, Keep: 3}, data: []byte("seq")},
		{op: opWrite, chunk: 8, req: ClientRequest{Client: 9, Seq: 4, Low: 4}, seq: Seq{SN: 2}, data: []byte("both")},
		{op: opTrim, chunk: 8, volume: 3, data: encodeTrim([]uint64{2, 4}, 6)},
	} {
		b := c.encode()
		got, err := decodeCommand(b)
		if err != nil {
			t.Fatalf("decode %+v: %v", c, err)
		}
		if !reflect.DeepEqual(got, c) {
			t.Fatalf("round trip: got %+v, want %+v", got, c)
		}
		if p, id, ok := proposalKey(b); !ok || p != c.proposer || id != c.id {
			t.Fatalf("proposalKey: %d %d %v", p, id, ok)
		}
	}
}

func TestDecodeCommandRefusesMalformed(t *testing.T) {
	good := (&command{op: opWrite, chunk: 1, data: []byte("abc")}).encode()
	withReq := (&command{op: opWrite, chunk: 1, req: ClientRequest{Client: 5, Seq: 1, Low: 1}}).encode()
	badOp := append([]byte(nil), good...)
	badOp[0] = 9
	withSeq := (&command{op: opWrite, chunk: 1, seq: Seq{SN: 2, Keep: 1}}).encode()
	trim := (&command{op: opTrim, chunk: 1, data: encodeTrim([]uint64{1}, 2)}).encode()
	for name, b := range map[string][]byte{
		"sequence flag, numbers short": withSeq[:commandFixedSize+seqSize-1],
		"trim cut short":               trim[:len(trim)-1],
		"trim of no data":              trim[:commandFixedSize],
		"empty":                        nil,
		"short":                        good[:commandFixedSize-1],
		"unknown op":                   badOp,
		"request flag, request short":  withReq[:commandFixedSize+requestSize-1],
	} {
		if _, err := decodeCommand(b); !errors.Is(err, errBadCommand) {
			t.Errorf("%s: %v, want errBadCommand", name, err)
		}
	}
	if _, _, ok := proposalKey(good[:commandHeaderSize-1]); ok {
		t.Error("proposalKey read a short header")
	}
}

// FuzzDecodeCommand: no input panics the decoder, and what decodes encodes
// back to a command that decodes the same.
func FuzzDecodeCommand(f *testing.F) {
	f.Add((&command{op: opWrite, proposer: 3, id: 9, chunk: 7, offset: 512, data: []byte("abc")}).encode())
	f.Add((&command{op: opDelete, req: ClientRequest{Client: 5, Seq: 2, Low: 1}}).encode())
	f.Add([]byte{opWrite | opHasRequest})
	f.Add((&command{op: opTrim, chunk: 1, data: encodeTrim([]uint64{1, 2}, 3)}).encode())
	f.Add((&command{op: opWrite, seq: Seq{SN: 3, Keep: 2}, data: []byte("x")}).encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := decodeCommand(b)
		if err != nil {
			return
		}
		again, err := decodeCommand(c.encode())
		if err != nil {
			t.Fatalf("re-encoded command does not decode: %v", err)
		}
		if c.req.Client == 0 {
			c.req = ClientRequest{} // without a client the request is not encoded
		}
		if !reflect.DeepEqual(again, c) && !(len(again.data) == 0 && len(c.data) == 0) {
			t.Fatalf("round trip: %+v != %+v", again, c)
		}
	})
}

func TestMetaRoundTripAndCorruption(t *testing.T) {
	dir := t.TempDir()
	m := &meta{Pool: 1, Copyset: 2, Applied: 40, AppliedTerm: 3, ConfEpoch: 7, Term: 3, Vote: 1, Commit: 40,
		Requests: newDedupTable().encode()}
	m.setConfState(&raftpb.ConfState{Voters: []uint64{1, 2, 3}, Learners: []uint64{4}})
	if err := (&metaWriter{dir: dir}).write(m); err != nil {
		t.Fatal(err)
	}
	got, err := readMeta(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, m) {
		t.Fatalf("read %+v, wrote %+v", got, m)
	}
	if hs := got.hardState(); hs.GetTerm() != 3 || hs.GetVote() != 1 || hs.GetCommit() != 40 {
		t.Fatalf("hard state %v", hs)
	}
	// Any change to a field without a new checksum is corruption.
	path := filepath.Join(dir, metaFile)
	b, _ := os.ReadFile(path)
	bad := bytes.Replace(b, []byte(`"applied":40`), []byte(`"applied":41`), 1)
	if bytes.Equal(bad, b) {
		t.Fatal("test did not change the file")
	}
	if err := os.WriteFile(path, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readMeta(dir); !errors.Is(err, ErrMetaCorrupt) {
		t.Fatalf("changed meta: %v, want ErrMetaCorrupt", err)
	}
}

// FuzzReadMeta: no file content panics the reader, and a file it accepts
// is written back unchanged in meaning.
func FuzzReadMeta(f *testing.F) {
	dir := f.TempDir()
	m := &meta{Pool: 1, Copyset: 1, Applied: 5, Voters: []uint64{1, 2, 3}}
	if err := (&metaWriter{dir: dir}).write(m); err != nil {
		f.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, metaFile))
	f.Add(b)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, metaFile), b, 0o644); err != nil {
			t.Fatal(err)
		}
		m, w, err := loadMeta(dir)
		if err != nil {
			return
		}
		if err := w.write(m); err != nil {
			t.Fatal(err)
		}
		again, err := readMeta(dir)
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("accepted meta does not survive a rewrite: %v", err)
		}
	})
}
