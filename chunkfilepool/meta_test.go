package chunkfilepool

import (
	"bytes"
	"errors"
	"testing"

	"cairn.io/cairn/internal/geometry"
)

func TestPoolMetaRoundTrip(t *testing.T) {
	g := Geometry{ChunkSize: geometry.DefaultChunkSize, MetaPageSize: geometry.DefaultMetaPageSize, BlockSize: geometry.DefaultBlockSize}
	b := EncodePoolMeta(g)
	got, err := DecodePoolMeta(b)
	if err != nil || got != g {
		t.Fatalf("decode: %+v %v", got, err)
	}
	for i := range b {
		bad := bytes.Clone(b)
		bad[i] ^= 0x40
		if _, err := DecodePoolMeta(bad); !errors.Is(err, ErrBadMeta) {
			t.Fatalf("flipped byte %d: %v, want ErrBadMeta", i, err)
		}
	}
	if _, err := DecodePoolMeta(b[:len(b)-1]); !errors.Is(err, ErrBadMeta) {
		t.Fatalf("short meta: %v", err)
	}
}

func TestPoolStateRoundTrip(t *testing.T) {
	b := encodePoolState(12345)
	n, err := decodePoolState(b)
	if err != nil || n != 12345 {
		t.Fatalf("decode: %d %v", n, err)
	}
	b[9] ^= 1
	if _, err := decodePoolState(b); !errors.Is(err, ErrBadMeta) {
		t.Fatalf("corrupt state: %v", err)
	}
}

// FuzzDecodePoolMeta checks that the decoder never panics, accepts only what
// the encoder produces, and accepts nothing that fails validation.
func FuzzDecodePoolMeta(f *testing.F) {
	f.Add(EncodePoolMeta(Geometry{ChunkSize: geometry.DefaultChunkSize, MetaPageSize: geometry.DefaultMetaPageSize, BlockSize: geometry.DefaultBlockSize}))
	f.Add(EncodePoolMeta(Geometry{ChunkSize: 1 << 20, MetaPageSize: 4096, BlockSize: 4096}))
	f.Add([]byte("CAIRNFP1"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := DecodePoolMeta(b)
		if err != nil {
			if !errors.Is(err, ErrBadMeta) {
				t.Fatalf("error does not wrap ErrBadMeta: %v", err)
			}
			return
		}
		if err := g.Validate(); err != nil {
			t.Fatalf("decoded invalid geometry %+v", g)
		}
		if !bytes.Equal(EncodePoolMeta(g), b) {
			t.Fatalf("decoded %+v from bytes the encoder does not produce", g)
		}
	})
}

// FuzzDecodePoolState does the same for the pool state file.
func FuzzDecodePoolState(f *testing.F) {
	f.Add(encodePoolState(0))
	f.Add(encodePoolState(1 << 20))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := decodePoolState(b)
		if err != nil {
			if !errors.Is(err, ErrBadMeta) {
				t.Fatalf("error does not wrap ErrBadMeta: %v", err)
			}
			return
		}
		if !bytes.Equal(encodePoolState(n), b) {
			t.Fatalf("decoded %d from bytes the encoder does not produce", n)
		}
	})
}
