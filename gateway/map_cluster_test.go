package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"cairn.io/cairn/internal/testtool"
)

// TestClusterSparseVolumeMapsAndCopiesByChunk: a volume of ten segments
// with a few 4 KiB pieces written maps, through nbdinfo --map, as exactly
// the chunks written (1 MiB each on the test cluster); nbdcopy of it reads
// those chunks and nothing else (the gateway's read bytes) and copies it
// whole; and qemu-img map through iSCSI (GET LBA STATUS) agrees with NBD.
func TestClusterSparseVolumeMapsAndCopiesByChunk(t *testing.T) {
	for _, tool := range []string{"nbdinfo", "nbdcopy", "qemu-img"} {
		testtool.Need(t, tool)
	}
	const (
		seg   = 64 << 20
		chunk = 1 << 20
		size  = 10 * seg
	)
	c := startCluster(t)
	createVolume(t, c, "sparse", size)
	g := startGateway(t, c, nil)
	// Held open: the volume's metrics stay while it is.
	h, err := catalog{g}.Open(context.Background(), "sparse")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	pieces := map[int64]byte{
		3*chunk + 8192:   0xa1, // chunk 3
		3*seg + 5*chunk:  0xb2, // chunk 197
		9*seg + 63*chunk: 0xc3, // chunk 639, the last
	}
	for off, b := range pieces {
		p := make([]byte, 4096)
		for i := range p {
			p[i] = b
		}
		if _, err := h.WriteAt(context.Background(), p, off); err != nil {
			t.Fatal(err)
		}
	}
	want := fmt.Sprint([][2]int64{{3 * chunk, 4 * chunk}, {3*seg + 5*chunk, 3*seg + 6*chunk}, {9*seg + 63*chunk, size}})

	// NBD block status.
	out := testtool.MustRun(t, time.Minute, "nbdinfo", "--map", "--json", nbdURL(g, "sparse"))
	var nbdMap []struct {
		Offset, Length int64
		Type           int
	}
	if err := json.Unmarshal([]byte(out), &nbdMap); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	var data [][2]int64
	var mapped int64
	for _, e := range nbdMap {
		if e.Offset != mapped {
			t.Fatalf("nbdinfo --map: extent at %d after %d bytes:\n%s", e.Offset, mapped, out)
		}
		mapped += e.Length
		if e.Type&1 == 0 { // not a hole
			data = appendRange(data, e.Offset, e.Offset+e.Length)
		}
	}
	if got := fmt.Sprint(data); got != want || mapped != size {
		t.Fatalf("nbdinfo --map: data %s over %d bytes, want %s over %d", got, mapped, want, int64(size))
	}

	// iSCSI GET LBA STATUS, through qemu's iscsi driver.
	out = testtool.MustRun(t, time.Minute, "qemu-img", "map", "--output=json", "-f", "raw", iscsiURL(g, "sparse"))
	var qemuMap []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal([]byte(out), &qemuMap); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	data = nil
	for _, e := range qemuMap {
		if e.Data {
			data = appendRange(data, e.Start, e.Start+e.Length)
		}
	}
	if got := fmt.Sprint(data); got != want {
		t.Fatalf("qemu-img map through iSCSI: data %s, want %s (as NBD maps it)\n%s", got, want, out)
	}

	// nbdcopy reads the data chunks only.
	before := readBytes(t, g, "sparse")
	dst := filepath.Join(t.TempDir(), "copy")
	testtool.MustRun(t, 2*time.Minute, "nbdcopy", nbdURL(g, "sparse"), dst)
	if read := readBytes(t, g, "sparse") - before; read != 3*chunk {
		t.Fatalf("nbdcopy of a volume with 3 chunks written read %d bytes, want %d", read, 3*chunk)
	}
	f, err := os.Open(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || st.Size() != size {
		t.Fatalf("copy: %v, %v bytes, want %d", err, st.Size(), int64(size))
	}
	for off, b := range pieces {
		got := make([]byte, 8192)
		if _, err := f.ReadAt(got, off-4096); err != nil {
			t.Fatal(err)
		}
		for i, x := range got {
			if want := map[bool]byte{true: b, false: 0}[i >= 4096]; x != want {
				t.Fatalf("copy at %d: byte %#x, want %#x", off-4096+int64(i), x, want)
			}
		}
	}
}

// appendRange adds [lo, hi) to sorted ranges, joining it to the last.
func appendRange(r [][2]int64, lo, hi int64) [][2]int64 {
	if k := len(r) - 1; k >= 0 && r[k][1] == lo {
		r[k][1] = hi
		return r
	}
	return append(r, [2]int64{lo, hi})
}

// readBytes is the gateway's count of bytes read from a volume.
func readBytes(t *testing.T, g *Gateway, volume string) int64 {
	t.Helper()
	_, body, err := httpGet("http://" + g.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`cairn_gateway_volume_bytes_total\{op="read",volume="` + regexp.QuoteMeta(volume) + `"\} (\S+)`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("metrics lack the bytes read of %s:\n%s", volume, grepLines(body, "cairn_gateway_volume_bytes"))
	}
	n, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return int64(n)
}
