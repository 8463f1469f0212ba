package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"
)

// These tests run the gateway with its real opener: client library volumes
// over an in-process cluster (1 MiB chunks, 64 MiB segments).

// TestClusterVolumeThroughBothFrontends writes through NBD and reads back
// through NBD and iSCSI, then writes through iSCSI and reads back through
// NBD. The volume is opened once: one session at the MDS, epoch 1.
func TestClusterVolumeThroughBothFrontends(t *testing.T) {
	for _, tool := range []string{"nbdcopy", "qemu-img"} {
		testtool.Need(t, tool)
	}
	c := startCluster(t)
	createVolume(t, c, "v", 128<<20)
	g := startGateway(t, c, nil)
	pin, err := catalog{g}.Open(context.Background(), "v")
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Close()

	dir := t.TempDir()
	first, second, back := filepath.Join(dir, "first"), filepath.Join(dir, "second"), filepath.Join(dir, "back")
	want := testtool.RandomFile(t, first, 40<<20)
	// Bounded parallelism: the in-process cluster shares two cores with
	// the race detector.
	testtool.MustRun(t, 2*time.Minute, "nbdcopy", "--connections=2", "--requests=8", first, nbdURL(g, "v"))
	testtool.MustRun(t, 2*time.Minute, "nbdcopy", nbdURL(g, "v"), back)
	compareFiles(t, want, back)
	testtool.MustRun(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", first, iscsiURL(g, "v"))

	over := testtool.RandomFile(t, second, 24<<20)
	testtool.MustRun(t, 2*time.Minute, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", second, iscsiURL(g, "v"))
	copy(want, over)
	os.Remove(back)
	testtool.MustRun(t, 2*time.Minute, "nbdcopy", nbdURL(g, "v"), back)
	compareFiles(t, want, back)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Conn.Volumes().StatVolume(ctx, &mdspb.StatVolumeRequest{Name: "v"})
	if err != nil {
		t.Fatal(err)
	}
	if e := st.GetVolume().GetEpoch(); e != 1 {
		t.Errorf("volume epoch %d after NBD and iSCSI users: the gateway opened it more than once", e)
	}
	if n := len(st.GetSessions()); n != 1 {
		t.Errorf("%d sessions at the MDS, want 1: %v", n, st.GetSessions())
	}
}

// TestClusterExtendReachesInitiators: after the volume is extended at the
// MDS, iSCSI initiators read the new capacity and new NBD connections the
// new size, within a few polls.
func TestClusterExtendReachesInitiators(t *testing.T) {
	for _, tool := range []string{"nbdinfo", "iscsi-readcapacity16"} {
		testtool.Need(t, tool)
	}
	c := startCluster(t)
	createVolume(t, c, "v", 64<<20)
	g := startGateway(t, c, nil)
	pin, err := catalog{g}.Open(context.Background(), "v")
	if err != nil {
		t.Fatal(err)
	}
	defer pin.Close()
	out := testtool.MustRun(t, time.Minute, "iscsi-readcapacity16", iscsiURL(g, "v"))
	if !strings.Contains(out, "Total size:67108864") {
		t.Fatalf("capacity before the extend:\n%s", out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Conn.Volumes().ExtendVolume(ctx, &mdspb.ExtendVolumeRequest{Name: "v", NewSize: 192 << 20}); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		out, err := testtool.Run(t, time.Minute, "iscsi-readcapacity16", iscsiURL(g, "v"))
		if err != nil || !strings.Contains(out, "Total size:201326592") {
			return fmt.Errorf("capacity after the extend: %v\n%s", err, out)
		}
		return nil
	})
	out = testtool.MustRun(t, time.Minute, "nbdinfo", nbdURL(g, "v"))
	if !strings.Contains(out, "export-size: 201326592") {
		t.Errorf("nbdinfo after the extend:\n%s", out)
	}
}

// TestClusterFencedByAnotherWriter: when another client opens the volume
// for writing, the gateway's writes fail; once its users left, the next
// NBD connection opens the volume again and writes work.
func TestClusterFencedByAnotherWriter(t *testing.T) {
	testtool.Need(t, "nbdcopy")
	c := startCluster(t)
	createVolume(t, c, "v", 64<<20)
	g := startGateway(t, c, func(cfg *Config) { cfg.Linger = time.Hour })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h, err := catalog{g}.Open(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	if _, err := h.WriteAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	other, err := client.Open(ctx, []string{c.MDS.Addr()}, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.WriteAt(ctx, buf, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt(ctx, buf, 0); !errors.Is(err, ErrFenced) {
		t.Fatalf("gateway write after another writer opened the volume: %v, want ErrFenced", err)
	}
	h.Close()
	if len(g.OpenVolumes()) != 0 {
		t.Fatalf("fenced volume still open without users: %v", g.OpenVolumes())
	}
	dir := t.TempDir()
	want := testtool.RandomFile(t, filepath.Join(dir, "in"), 4<<20)
	testtool.MustRun(t, time.Minute, "nbdcopy", filepath.Join(dir, "in"), nbdURL(g, "v"))
	testtool.MustRun(t, time.Minute, "nbdcopy", nbdURL(g, "v"), filepath.Join(dir, "back"))
	compareFiles(t, want, filepath.Join(dir, "back"))
	if _, err := other.WriteAt(ctx, buf, 1<<20); !errors.Is(err, client.ErrFenced) {
		t.Errorf("the other writer after the gateway reopened: %v, want ErrFenced", err)
	}
	other.Close()
	_, body, err := httpGet("http://" + g.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, re := range []string{`cairn_gateway_volumes_fenced_total 1`, `cairn_gateway_volume_opens_total 2`,
		`cairn_gateway_client_chunk_requests_total\{volume="v"\} [1-9]`,
		`cairn_gateway_volume_op_duration_seconds_count\{op="write",volume="v"\} [1-9]`,
		`cairn_gateway_volume_op_duration_seconds_count\{op="read",volume="v"\} [1-9]`,
		`cairn_gateway_volume_bytes_total\{op="write",volume="v"\} [1-9]`,
		`cairn_gateway_volume_errors_total\{op="write",volume="v"\} 0`} {
		if !regexp.MustCompile(re).MatchString(body) {
			t.Errorf("metrics lack %s:\n%s", re, grepLines(body, "cairn_gateway_"))
		}
	}
}

// TestClusterMapShowsUnallocatedSegments: nbdinfo --map over a volume shows
// the segments never written, and the chunks never written of the others,
// as holes, so copies skip them.
func TestClusterMapShowsUnallocatedSegments(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	c := startCluster(t)
	const seg = 64 << 20
	createVolume(t, c, "sparse", 4*seg)
	g := startGateway(t, c, nil)
	h, err := catalog{g}.Open(context.Background(), "sparse")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	// One block into the third segment: only that segment is allocated,
	// and of it only its first chunk (1 MiB) written.
	if _, err := h.WriteAt(context.Background(), make([]byte, 4096), 2*seg+8192); err != nil {
		t.Fatal(err)
	}
	out := testtool.MustRun(t, time.Minute, "nbdinfo", "--map", "--json", nbdURL(g, "sparse"))
	var got []struct {
		Offset, Length int64
		Type           int
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	want := fmt.Sprint([]any{[]int64{0, 2 * seg, 3}, []int64{2 * seg, 1 << 20, 0}, []int64{2*seg + 1<<20, 2*seg - 1<<20, 3}})
	var have []any
	for _, e := range got {
		have = append(have, []int64{e.Offset, e.Length, int64(e.Type)})
	}
	if fmt.Sprint(have) != want {
		t.Fatalf("map (offset, length, type 3 = hole):\n got %v\nwant %v", have, want)
	}
}
