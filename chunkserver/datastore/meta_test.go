package datastore

import (
	"bytes"
	"errors"
	"testing"
)

func TestMetaPageRoundTripAndDamage(t *testing.T) {
	m := ChunkMeta{Version: MetaVersion, ChunkID: 77, CreatedSN: 3, ChunkSize: 16 << 20}
	page := EncodeMetaPage(m, 4096)
	got, err := DecodeMetaPage(page)
	if err != nil || got != m {
		t.Fatalf("decode %+v %v", got, err)
	}
	for _, off := range []int{0, 9, 16, 30, 44, 100, 4000, 4095} {
		bad := bytes.Clone(page)
		bad[off] ^= 1
		if _, err := DecodeMetaPage(bad); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flipped byte %d: %v, want ErrCorrupt", off, err)
		}
	}
	if _, err := DecodeMetaPage(page[:256]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("short page: %v", err)
	}
	// An all-zero page (a pool file whose meta page was never written) is corrupt.
	if _, err := DecodeMetaPage(make([]byte, 4096)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("zero page: %v", err)
	}
}

// FuzzDecodeMetaPage checks that the decoder never panics, only accepts what
// the encoder produces, and reports every rejection as ErrCorrupt.
func FuzzDecodeMetaPage(f *testing.F) {
	f.Add(EncodeMetaPage(ChunkMeta{Version: MetaVersion, ChunkID: 1, ChunkSize: 16 << 20}, 512))
	f.Add(EncodeMetaPage(ChunkMeta{Version: MetaVersion, ChunkID: 1 << 40, CreatedSN: 9, ChunkSize: 1 << 20}, 1024))
	f.Add(make([]byte, 512))
	f.Add([]byte("CAIRNCK1"))
	f.Fuzz(func(t *testing.T, page []byte) {
		m, err := DecodeMetaPage(page)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error does not wrap ErrCorrupt: %v", err)
			}
			return
		}
		if !bytes.Equal(EncodeMetaPage(m, len(page)), page) {
			t.Fatalf("decoded %+v from a page the encoder does not produce", m)
		}
	})
}
