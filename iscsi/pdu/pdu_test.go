package pdu

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"testing"
)

// RFC 3720 appendix B.4 gives CRC32C test vectors as the bytes sent on the
// wire.
func TestCRC32CVectors(t *testing.T) {
	inc := make([]byte, 32)
	for i := range inc {
		inc[i] = byte(i)
	}
	cases := []struct {
		in   []byte
		wire []byte
	}{
		{make([]byte, 32), []byte{0xaa, 0x36, 0x91, 0x8a}},
		{bytes.Repeat([]byte{0xff}, 32), []byte{0x43, 0xab, 0xa8, 0x62}},
		{inc, []byte{0x4e, 0x79, 0xdd, 0x46}},
	}
	for _, c := range cases {
		var got [4]byte
		binary.LittleEndian.PutUint32(got[:], CRC32C(c.in))
		if !bytes.Equal(got[:], c.wire) {
			t.Errorf("CRC32C(%x...) on the wire = %x, want %x", c.in[:4], got, c.wire)
		}
	}
}

func samplePDU() *PDU {
	p := &PDU{AHS: []byte{0, 5, 1, 0, 0xa0, 0xa1, 0xa2, 0xa3}, Data: []byte("hello, iscsi")}
	p.BHS.SetOpcode(OpSCSICommand)
	p.BHS[1] = 0xc1
	p.BHS.SetITT(0x01020304)
	p.BHS.SetU32(OffEDTL, 4096)
	p.BHS.SetLUN(0x0001000000000000)
	return p
}

func TestRoundTripWithDigestsAndPadding(t *testing.T) {
	for _, hd := range []bool{false, true} {
		for _, dd := range []bool{false, true} {
			p := samplePDU()
			var buf bytes.Buffer
			if err := Write(&buf, p, hd, dd); err != nil {
				t.Fatal(err)
			}
			want := BHSLen + len(p.AHS) + 12 // data padded to 12
			if hd {
				want += 4
			}
			if dd {
				want += 4
			}
			if buf.Len() != want {
				t.Fatalf("hd=%v dd=%v: %d bytes on the wire, want %d", hd, dd, buf.Len(), want)
			}
			r := Reader{R: &buf, HeaderDigest: hd, DataDigest: dd}
			var got PDU
			if err := r.Read(&got); err != nil {
				t.Fatal(err)
			}
			if got.BHS != p.BHS || !bytes.Equal(got.AHS, p.AHS) || !bytes.Equal(got.Data, p.Data) {
				t.Fatalf("hd=%v dd=%v: round trip changed the PDU", hd, dd)
			}
			if got.BHS.LUN() != 0x0001000000000000 || got.BHS.ITT() != 0x01020304 || !got.BHS.Final() {
				t.Fatal("field accessors disagree")
			}
			if buf.Len() != 0 {
				t.Fatalf("%d bytes left unread", buf.Len())
			}
		}
	}
}

func TestDigestMismatchesAreDetected(t *testing.T) {
	var buf bytes.Buffer
	if err := Write(&buf, samplePDU(), true, true); err != nil {
		t.Fatal(err)
	}
	wire := buf.Bytes()
	hdr := append([]byte(nil), wire...)
	hdr[20] ^= 1
	r := Reader{R: bytes.NewReader(hdr), HeaderDigest: true, DataDigest: true}
	if err := r.Read(&PDU{}); !errors.Is(err, ErrHeaderDigest) {
		t.Fatalf("corrupt header: %v, want ErrHeaderDigest", err)
	}
	data := append([]byte(nil), wire...)
	data[BHSLen+8+4+2] ^= 1
	r = Reader{R: bytes.NewReader(data), HeaderDigest: true, DataDigest: true}
	if err := r.Read(&PDU{}); !errors.Is(err, ErrDataDigest) {
		t.Fatalf("corrupt data: %v, want ErrDataDigest", err)
	}
}

func TestDataSegmentLimit(t *testing.T) {
	p := &PDU{Data: make([]byte, 9000)}
	p.BHS.SetOpcode(OpNopOut)
	var buf bytes.Buffer
	if err := Write(&buf, p, false, false); err != nil {
		t.Fatal(err)
	}
	r := Reader{R: &buf} // RFC default limit 8192
	if err := r.Read(&PDU{}); !errors.Is(err, ErrDataTooLong) {
		t.Fatalf("9000-byte segment: %v, want ErrDataTooLong", err)
	}
	if buf.Len() != 9000 {
		t.Fatalf("data consumed despite the error: %d left", buf.Len())
	}
}

func TestTruncatedInput(t *testing.T) {
	var buf bytes.Buffer
	if err := Write(&buf, samplePDU(), false, false); err != nil {
		t.Fatal(err)
	}
	wire := buf.Bytes()
	for _, n := range []int{0, 10, BHSLen, BHSLen + 4, len(wire) - 1} {
		r := Reader{R: bytes.NewReader(wire[:n])}
		err := r.Read(&PDU{})
		if n == 0 && err != io.EOF || n > 0 && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("%d of %d bytes: %v", n, len(wire), err)
		}
	}
}

func TestParseText(t *testing.T) {
	got, err := ParseText([]byte("InitiatorName=iqn.x:y\x00HeaderDigest=CRC32C,None\x00\x00Empty=\x00Last=1"))
	if err != nil {
		t.Fatal(err)
	}
	want := []KV{{"InitiatorName", "iqn.x:y"}, {"HeaderDigest", "CRC32C,None"}, {"Empty", ""}, {"Last", "1"}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v", got)
	}
	if !bytes.Equal(EncodeText(want), []byte("InitiatorName=iqn.x:y\x00HeaderDigest=CRC32C,None\x00Empty=\x00Last=1\x00")) {
		t.Fatal("EncodeText")
	}
	for _, bad := range []string{"novalue\x00", "=x\x00", "bad key=1\x00", string(bytes.Repeat([]byte("k"), 64)) + "=1"} {
		if _, err := ParseText([]byte(bad)); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseText(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}
