package fsutil

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteAtInPiecesWritesEveryByteInPlace(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 4*PieceSize + 8192
	want := make([]byte, size)
	if _, err := f.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		off int64
		n   int
	}{
		{0, 4096}, {0, PieceSize}, {PieceSize - 100, 200}, {4096, 3 * PieceSize}, {PieceSize + 1, 2*PieceSize + 7}, {3*PieceSize + 5, PieceSize + 100}, {10, 0},
	} {
		p := bytes.Repeat([]byte{byte(i + 1)}, c.n)
		n, err := WriteAtInPieces(f, p, c.off)
		if err != nil || n != c.n {
			t.Fatalf("write %d at %d: %d, %v", c.n, c.off, n, err)
		}
		copy(want[c.off:], p)
		got := make([]byte, size)
		if _, err := f.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("after writing %d bytes at %d the file differs from what was written", c.n, c.off)
		}
	}
}

func TestWriteAtInPiecesReportsWhatItWroteBeforeAnError(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	n, err := WriteAtInPieces(f, make([]byte, 3*PieceSize), 0)
	if err == nil || n != 0 {
		t.Fatalf("write to a closed file: %d, %v; want 0 and an error", n, err)
	}
}
