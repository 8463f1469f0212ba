package scsi

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"
)

// mappedDevice is a device whose map of holes is set by the test, whatever
// its blocks hold: data lists the byte ranges that are data.
type mappedDevice struct {
	*blockdevtest.Device
	data  [][2]int64
	fail  error
	calls int
}

func (d *mappedDevice) Map(ctx context.Context, off, length int64) ([]blockdev.Extent, error) {
	d.calls++
	if d.fail != nil {
		return nil, d.fail
	}
	var out []blockdev.Extent
	add := func(n int64, hole bool) {
		if n <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Hole == hole {
			out[k].Length += n
			return
		}
		out = append(out, blockdev.Extent{Length: n, Hole: hole})
	}
	pos, end := off, off+length
	for _, r := range d.data {
		lo, hi := max(r[0], pos), min(r[1], end)
		if lo >= hi {
			continue
		}
		add(lo-pos, true)
		add(hi-lo, false)
		pos = hi
	}
	add(end-pos, true)
	return out, nil
}

// lbaStatus runs GET LBA STATUS at lba with an allocation length and
// returns its descriptors as "lba+blocks:m|d".
func lbaStatus(t *testing.T, lu *LogicalUnit, lba uint64, alloc uint32) string {
	t.Helper()
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opServiceActionIn16, lba, alloc, saGetLBAStatus)})
	expectGood(t, fmt.Sprintf("GET LBA STATUS at %d", lba), r)
	if len(r.Data) < 8 {
		t.Fatalf("GET LBA STATUS at %d returned %d bytes", lba, len(r.Data))
	}
	pdl := binary.BigEndian.Uint32(r.Data[0:4])
	if (pdl-4)%16 != 0 || int(pdl)+4 != len(r.Data) {
		t.Fatalf("GET LBA STATUS at %d: parameter data length %d with %d bytes", lba, pdl, len(r.Data))
	}
	var out []string
	for d := r.Data[8:]; len(d) >= 16; d = d[16:] {
		st := "m"
		if d[12]&0x0f == 1 {
			st = "d"
		}
		out = append(out, fmt.Sprintf("%d+%d:%s", binary.BigEndian.Uint64(d[0:8]), binary.BigEndian.Uint32(d[8:12]), st))
	}
	return strings.Join(out, " ")
}

// TestGetLBAStatusAnswersFromTheDeviceMap: a backend with a map is asked
// for it (blocks it calls data are mapped though they read as zeros, holes
// deallocated though they do not), as many descriptors as the allocation
// length holds; partly data blocks are mapped; a failing map is a medium
// error; a backend without a map is scanned for zeros as before.
func TestGetLBAStatusAnswersFromTheDeviceMap(t *testing.T) {
	const size = 1 << 20 // 2048 blocks
	be := &mappedDevice{Device: blockdevtest.New(size), data: [][2]int64{{64 << 10, 128 << 10}, {512 << 10, 516 << 10}}}
	// Non-zero blocks in a hole of the map: the map, not the contents, answers.
	if _, err := be.WriteAt(bg, []byte{0xff}, 300<<9); err != nil {
		t.Fatal(err)
	}
	lu, err := New(Config{Backend: be, Name: "mapped"})
	if err != nil {
		t.Fatal(err)
	}
	attach(lu, nexA)
	if got := lu.DataInLen(cdb16(opServiceActionIn16, 0, 24, saGetLBAStatus)); got != 0 {
		t.Fatalf("GET LBA STATUS of a mapped backend accounts %d bytes of buffers", got)
	}
	for _, c := range []struct {
		lba   uint64
		alloc uint32
		want  string
	}{
		{0, 24, "0+128:d"},
		{0, 8 + 16*3, "0+128:d 128+128:m 256+768:d"},
		{0, 4096, "0+128:d 128+128:m 256+768:d 1024+8:m 1032+1016:d"},
		{130, 4096, "130+126:m 256+768:d 1024+8:m 1032+1016:d"},
		{2047, 4096, "2047+1:d"},
	} {
		if got := lbaStatus(t, lu, c.lba, c.alloc); got != c.want {
			t.Errorf("GET LBA STATUS at %d, allocation length %d:\n got %s\nwant %s", c.lba, c.alloc, got, c.want)
		}
	}
	// An allocation length shorter than a descriptor cuts it.
	r := lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opServiceActionIn16, 1024, 16, saGetLBAStatus)})
	expectGood(t, "GET LBA STATUS, allocation length 16", r)
	if len(r.Data) != 16 || binary.BigEndian.Uint32(r.Data[0:4]) != 20 || binary.BigEndian.Uint64(r.Data[8:16]) != 1024 {
		t.Fatalf("GET LBA STATUS, allocation length 16: %x", r.Data)
	}
	expectSense(t, "GET LBA STATUS past the end", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opServiceActionIn16, 2048, 24, saGetLBAStatus)}), KeyIllegalRequest, 0x21, 0)

	// A map that does not fall on blocks: a block partly data is mapped.
	be.data = [][2]int64{{1000, 1100}, {4096, 4096 + 100}}
	if got, want := lbaStatus(t, lu, 0, 4096), "0+1:d 1+2:m 3+5:d 8+1:m 9+2039:d"; got != want {
		t.Errorf("unaligned map:\n got %s\nwant %s", got, want)
	}
	be.fail = errBackend
	expectSense(t, "GET LBA STATUS with a failing map", lu.Execute(bg, &Command{Nexus: nexA, CDB: cdb16(opServiceActionIn16, 0, 24, saGetLBAStatus)}), KeyMediumError, 0x11, 0)

	// Without a map: the blocks are read, zeros are deallocated.
	calls := be.calls
	plain, err := New(Config{Backend: struct{ blockdev.Device }{be}, Name: "plain"})
	if err != nil {
		t.Fatal(err)
	}
	attach(plain, nexA)
	if got := plain.DataInLen(cdb16(opServiceActionIn16, 0, 24, saGetLBAStatus)); got != zeroScanBytes {
		t.Fatalf("GET LBA STATUS of a backend without a map accounts %d bytes, want the scan's %d", got, zeroScanBytes)
	}
	if got, want := lbaStatus(t, plain, 0, 4096), "0+300:d"; got != want {
		t.Errorf("scan at 0: %s, want %s", got, want)
	}
	if got, want := lbaStatus(t, plain, 300, 4096), "300+1:m"; got != want {
		t.Errorf("scan at 300: %s, want %s", got, want)
	}
	if be.calls != calls {
		t.Fatal("a backend hidden behind blockdev.Device was asked for its map")
	}
}
