package client_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/test/cluster"
)

const chunk = 1 << 20 // test cluster chunk size

// mapOf maps [0, size) of a volume, asking again from where each answer
// ends, and returns its data extents as "[start,end)" in MiB, and how many
// Map calls it took. A snapshot handle's refusals while the MDS has not
// confirmed it for a lease are retried for a while (as readAll does).
func mapOf(t *testing.T, v *client.Volume, size int64) (string, int) {
	t.Helper()
	var data []string
	calls := 0
	deadline := time.Now().Add(30 * time.Second)
	for off := int64(0); off < size; {
		ext, err := v.Map(ctx, off, size-off)
		calls++
		if errors.Is(err, client.ErrUnavailable) && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		if err != nil || len(ext) == 0 {
			t.Fatalf("map %s at %d: %v %v", v.Name(), off, ext, err)
		}
		for _, e := range ext {
			if e.Length <= 0 || off+e.Length > size {
				t.Fatalf("map %s at %d: extent of %d bytes", v.Name(), off, e.Length)
			}
			if !e.Hole {
				data = append(data, fmt.Sprintf("[%g,%g)", float64(off)/chunk, float64(off+e.Length)/chunk))
			}
			off += e.Length
		}
	}
	return strings.Join(data, " "), calls
}

// TestMapIsChunkGranular: scattered 4 KiB writes into a volume of many
// segments map as exactly the chunks they touched (one write across a
// chunk bound as both), for the writer, a read-only handle and, after
// later writes and an unmap, a snapshot taken in between; whole chunks
// unmapped are holes again, partly unmapped ones stay data; a range
// starting inside a chunk maps from there.
func TestMapIsChunkGranular(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	const size = 20 * seg // more segments than one Map call looks at
	createVolume(t, c, "sparse", size)
	v := open(t, c, "sparse", client.Options{})
	if got, _ := mapOf(t, v, size); got != "" {
		t.Fatalf("fresh volume maps data %s", got)
	}
	for _, off := range []int64{
		3*chunk + 4096,   // chunk 3
		5*chunk - 2048,   // chunks 4 and 5
		seg - 4096,       // chunk 63, the last of segment 0
		2*seg + 10*chunk, // segment 2
		2*seg + 10*chunk + 8192,
		17*seg + 40*chunk + 512, // beyond the first Map call
	} {
		if _, err := v.WriteAt(ctx, make([]byte, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	want := "[3,6) [63,64) [138,139) [1128,1129)"
	got, calls := mapOf(t, v, size)
	if got != want {
		t.Fatalf("map after the writes (MiB):\n got %s\nwant %s", got, want)
	}
	if calls < 2 {
		t.Fatalf("mapping 20 segments took %d call(s): a call must look at no more than 16", calls)
	}
	ro := open(t, c, "sparse", client.Options{ReadOnly: true})
	if got, _ := mapOf(t, ro, size); got != want {
		t.Fatalf("map through a read-only handle:\n got %s\nwant %s", got, want)
	}
	// From inside a chunk: the first extent starts at the offset asked.
	ext, err := v.Map(ctx, 3*chunk+512, chunk)
	if err != nil || len(ext) != 1 || ext[0].Hole || ext[0].Length != chunk {
		t.Fatalf("map of [3 MiB + 512, +1 MiB): %+v %v", ext, err)
	}
	ext, err = v.Map(ctx, 6*chunk+512, 2*chunk)
	if err != nil || len(ext) != 1 || !ext[0].Hole {
		t.Fatalf("map of [6 MiB + 512, +2 MiB): %+v %v", ext, err)
	}

	if _, err := c.Conn.Volumes().CreateSnapshot(ctx, &mdspb.CreateSnapshotRequest{Volume: "sparse", Name: "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(ctx, make([]byte, 4096), seg+chunk); err != nil { // chunk 65, after the snapshot
		t.Fatal(err)
	}
	// Part of chunk 63, and the whole of chunk 1128, which the snapshot
	// reads: it is kept, zeroed, and stays data.
	if err := v.UnmapAt(ctx, 63*chunk, 4096); err != nil {
		t.Fatal(err)
	}
	if err := v.UnmapAt(ctx, 1128*chunk, chunk); err != nil {
		t.Fatal(err)
	}
	snap := open(t, c, "sparse", client.Options{Snapshot: "s1"})
	if got, _ := mapOf(t, snap, size); got != want {
		t.Fatalf("map of the snapshot:\n got %s\nwant %s", got, want)
	}
	want = "[3,6) [63,64) [65,66) [138,139) [1128,1129)"
	if got, _ := mapOf(t, v, size); got != want {
		t.Fatalf("map after the writes and unmaps since the snapshot:\n got %s\nwant %s", got, want)
	}

	// Without snapshots an unmapped whole chunk is deleted: a hole.
	createVolume(t, c, "plain", 2*seg)
	p := open(t, c, "plain", client.Options{})
	for _, off := range []int64{0, 7 * chunk, seg + 3*chunk} {
		if _, err := p.WriteAt(ctx, make([]byte, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.UnmapAt(ctx, 7*chunk, chunk); err != nil {
		t.Fatal(err)
	}
	if err := p.UnmapAt(ctx, 0, 4096); err != nil {
		t.Fatal(err)
	}
	if got, _ := mapOf(t, p, 2*seg); got != "[0,1) [67,68)" {
		t.Fatalf("map after unmapping chunk 7 whole and part of chunk 0: %s", got)
	}
}
