package copyset

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestMetaCheckpointsWriteSlotsInPlace: checkpoints after the first write
// the meta into the file's other slot in place (same file, same size), so
// that the newest generation wins and a torn write of a slot falls back to
// the previous checkpoint, never to nothing.
func TestMetaCheckpointsWriteSlotsInPlace(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, metaFile)
	m := &meta{Pool: 1, Copyset: 2, Voters: []uint64{1, 2, 3}}
	var ino uint64
	for applied := uint64(1); applied <= 5; applied++ {
		m.Applied = applied
		if err := writeMeta(dir, m); err != nil {
			t.Fatal(err)
		}
		got, err := readMeta(dir)
		if err != nil || got.Applied != applied {
			t.Fatalf("after writing applied %d: read %+v, %v", applied, got, err)
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if i := inode(t, st); applied == 1 {
			ino = i
		} else if i != ino {
			t.Fatalf("checkpoint %d replaced the file (inode %d, was %d): it must write a slot in place", applied, i, ino)
		}
	}
	// Tear the newest slot (applied 5, generation 5, slot 1): the previous
	// checkpoint is read.
	raw, _ := os.ReadFile(path)
	slot := len(raw) / 2
	raw[slot+metaSlotHeader+3] ^= 0xff
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := readMeta(dir); err != nil || got.Applied != 4 {
		t.Fatalf("with the newest slot torn: read %+v, %v; want applied 4", got, err)
	}
	// Both torn: corrupt, never an empty checkpoint.
	raw[metaSlotHeader+3] ^= 0xff
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := readMeta(dir); !errors.Is(err, ErrMetaCorrupt) {
		t.Fatalf("both slots torn: %v, want ErrMetaCorrupt", err)
	}
}

// TestMetaOutgrowsItsSlotAndReadsOldFiles: a meta larger than its slot is
// written as a new file with bigger slots; a meta file of the plain JSON
// layout is read, and the next checkpoint replaces it.
func TestMetaOutgrowsItsSlotAndReadsOldFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, metaFile)
	m := &meta{Pool: 1, Copyset: 2, Applied: 7, Voters: []uint64{1, 2, 3}}
	m.Version = metaVersion
	m.CRC = m.checksum()
	old, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(path, old, 0o644); err != nil {
		t.Fatal(err)
	}
	if got, err := readMeta(dir); err != nil || got.Applied != 7 {
		t.Fatalf("plain JSON meta: %+v, %v", got, err)
	}
	m.Applied = 8
	if err := writeMeta(dir, m); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	if bytes.HasPrefix(raw, []byte("{")) || len(raw) != 2*metaMinSlot {
		t.Fatalf("after a checkpoint the file is %d bytes starting %q; want two %d-byte slots", len(raw), raw[:8], metaMinSlot)
	}
	m.Requests = bytes.Repeat([]byte{7}, 3*metaMinSlot)
	m.Applied = 9
	if err := writeMeta(dir, m); err != nil {
		t.Fatal(err)
	}
	if got, err := readMeta(dir); err != nil || got.Applied != 9 || !bytes.Equal(got.Requests, m.Requests) {
		t.Fatalf("grown meta: applied %v, %v", got, err)
	}
	if raw, _ := os.ReadFile(path); len(raw) <= 2*metaMinSlot {
		t.Fatalf("grown meta kept %d bytes of slots", len(raw))
	}
}

func inode(t *testing.T, st os.FileInfo) uint64 {
	t.Helper()
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		t.Skip("no inode numbers on this platform")
	}
	return sys.Ino
}
