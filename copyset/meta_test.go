package copyset

import (
	"bytes"
	"encoding/binary"
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
	w := &metaWriter{dir: dir}
	var ino uint64
	for applied := uint64(1); applied <= 5; applied++ {
		m.Applied = applied
		if err := w.write(m); err != nil {
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
	_, w, err := loadMeta(dir)
	if err != nil {
		t.Fatal(err)
	}
	m.Applied = 8
	if err := w.write(m); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(path)
	if bytes.HasPrefix(raw, []byte("{")) || len(raw) != 2*metaMinSlot {
		t.Fatalf("after a checkpoint the file is %d bytes starting %q; want two %d-byte slots", len(raw), raw[:8], metaMinSlot)
	}
	m.Requests = bytes.Repeat([]byte{7}, 3*metaMinSlot)
	m.Applied = 9
	if err := w.write(m); err != nil {
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

// TestMetaSlotsFollowWhatWasMadeDurable: the next slot is chosen from the
// generation the writer last made durable, not from what the file shows
// (after a failed fdatasync the page cache can show a slot the disk does
// not hold), and after a failed write the file is replaced whole.
func TestMetaSlotsFollowWhatWasMadeDurable(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, metaFile)
	m := &meta{Pool: 1, Copyset: 2, Voters: []uint64{1, 2, 3}}
	w := &metaWriter{dir: dir}
	for applied := uint64(1); applied <= 3; applied++ { // generation 3 lands in slot 1
		m.Applied = applied
		if err := w.write(m); err != nil {
			t.Fatal(err)
		}
	}
	// The file shows a generation 4 in slot 0 that the writer never made
	// durable. The next checkpoint goes to slot 0, leaving generation 3.
	raw, _ := os.ReadFile(path)
	slot := len(raw) / 2
	shown := *m
	shown.Applied = 99
	shown.Version = metaVersion
	shown.CRC = shown.checksum()
	b, _ := json.Marshal(&shown)
	copy(raw, encodeMetaSlot(4, b, 0))
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	m.Applied = 4
	if err := w.write(m); err != nil {
		t.Fatal(err)
	}
	raw, _ = os.ReadFile(path)
	if g := binary.LittleEndian.Uint64(raw[slot+8:]); g != 3 {
		t.Fatalf("the durable generation 3 in slot 1 was overwritten (slot 1 now holds generation %d)", g)
	}
	if got, err := readMeta(dir); err != nil || got.Applied != 4 {
		t.Fatalf("read %+v, %v; want applied 4", got, err)
	}

	// A failed write: the next one replaces the file whole.
	if err := os.Rename(path, path+".away"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	m.Applied = 5
	if err := w.write(m); err == nil {
		t.Fatal("a write over a directory succeeded")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".away", path); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(path)
	before := inode(t, st)
	if err := w.write(m); err != nil {
		t.Fatal(err)
	}
	st, _ = os.Stat(path)
	if inode(t, st) == before {
		t.Fatal("after a failed write the meta was written in place; it must be replaced whole")
	}
	if got, err := readMeta(dir); err != nil || got.Applied != 5 {
		t.Fatalf("read %+v, %v; want applied 5", got, err)
	}
}
