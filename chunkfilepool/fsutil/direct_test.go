package fsutil

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestAlignedBuffersAreZeroAndAligned(t *testing.T) {
	for _, n := range []int{1, 4096, 5000, 1 << 20} {
		b := AlignedBuffer(n)
		if len(b) != n || !Aligned(b) || !bytes.Equal(b, make([]byte, n)) {
			t.Fatalf("AlignedBuffer(%d): length %d, aligned %v", n, len(b), Aligned(b))
		}
	}
	if Aligned(AlignedBuffer(8192)[1:]) {
		t.Fatal("a buffer one byte past a page boundary reads as aligned")
	}
}

// TestDirectWritesReachTheFile: where the filesystem takes O_DIRECT, an
// aligned write through OpenDirect's descriptor is what the file holds.
func TestDirectWritesReachTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, make([]byte, 2*DirectAlign), 0o600); err != nil {
		t.Fatal(err)
	}
	d := OpenDirect(path)
	if d == nil {
		t.Skip("no O_DIRECT here")
	}
	defer d.Close()
	p := AlignedBuffer(DirectAlign)
	copy(p, bytes.Repeat([]byte("direct|"), DirectAlign/7))
	if _, err := d.WriteAt(p, DirectAlign); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[DirectAlign:], p) || !bytes.Equal(got[:DirectAlign], make([]byte, DirectAlign)) {
		t.Fatal("the file does not hold what was written with O_DIRECT")
	}
}
