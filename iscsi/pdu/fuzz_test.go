package pdu

import (
	"bytes"
	"testing"
)

// FuzzReader feeds arbitrary bytes to the PDU reader. It must never panic
// nor read past a limit, and whatever it accepts must survive a round
// trip through Write unchanged.
func FuzzReader(f *testing.F) {
	var buf bytes.Buffer
	_ = Write(&buf, samplePDU(), false, false)
	f.Add(buf.Bytes(), false, false)
	buf.Reset()
	_ = Write(&buf, samplePDU(), true, true)
	f.Add(buf.Bytes(), true, true)
	f.Fuzz(func(t *testing.T, in []byte, hd, dd bool) {
		r := Reader{R: bytes.NewReader(in), HeaderDigest: hd, DataDigest: dd, MaxData: 1 << 16}
		var p PDU
		if err := r.Read(&p); err != nil {
			return
		}
		if len(p.Data) > 1<<16 || len(p.AHS) > 255*4 {
			t.Fatalf("limits exceeded: %d data, %d AHS", len(p.Data), len(p.AHS))
		}
		var out bytes.Buffer
		if err := Write(&out, &p, hd, dd); err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		r2 := Reader{R: &out, HeaderDigest: hd, DataDigest: dd, MaxData: 1 << 16}
		var q PDU
		if err := r2.Read(&q); err != nil {
			t.Fatalf("re-read: %v", err)
		}
		if q.BHS != p.BHS || !bytes.Equal(q.AHS, p.AHS) || !bytes.Equal(q.Data, p.Data) {
			t.Fatal("round trip changed the PDU")
		}
	})
}

// FuzzParseText checks that login/text parsing never panics and that what
// it accepts encodes back to text that parses the same.
func FuzzParseText(f *testing.F) {
	f.Add([]byte("InitiatorName=iqn.2026-11.io.cairn.test:i\x00SessionType=Normal\x00TargetName=iqn.2026-11.io.cairn:v\x00"))
	f.Add([]byte("AuthMethod=CHAP,None\x00CHAP_A=5\x00"))
	f.Fuzz(func(t *testing.T, in []byte) {
		kvs, err := ParseText(in)
		if err != nil {
			return
		}
		again, err := ParseText(EncodeText(kvs))
		if err != nil {
			t.Fatalf("re-parse: %v", err)
		}
		if len(again) != len(kvs) {
			t.Fatalf("%d pairs became %d", len(kvs), len(again))
		}
		for i := range kvs {
			if kvs[i] != again[i] {
				t.Fatalf("pair %d changed: %v -> %v", i, kvs[i], again[i])
			}
		}
	})
}
