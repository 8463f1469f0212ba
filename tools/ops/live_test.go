package ops

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/test/cluster"
)

// liveCluster is a whole cluster in the test process: an MDS and three real
// chunkservers (Raft, chunk file pools, chunk files on disk) in three zones,
// with a logical pool.
type liveCluster struct {
	*cluster.Cluster
	t *testing.T
}

func startLive(t *testing.T) *liveCluster {
	t.Helper()
	return &liveCluster{Cluster: cluster.Start(t, cluster.Options{CopysetsPerChunkServer: 4, Schedule: mds.ScheduleConfig{Interval: 2 * time.Second}}), t: t}
}

func (c *liveCluster) run(args ...string) runResult {
	return runOps(c.t, "", append([]string{"--mds", c.MDS.Addr(), "--timeout", "10s"}, args...)...)
}

func (c *liveCluster) jsonRun(wantCode int, args ...string) map[string]any {
	c.t.Helper()
	r := c.run(append([]string{"-o", "json"}, args...)...)
	if r.code != wantCode {
		c.t.Fatalf("cairn-ops -o json %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, wantCode, r.stdout, r.stderr)
	}
	return decodeJSON(c.t, r.stdout)
}

func (c *liveCluster) mustRun(args ...string) runResult {
	c.t.Helper()
	r := c.run(args...)
	if r.code != ExitOK {
		c.t.Fatalf("cairn-ops %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// index returns the cluster index of the chunkserver with id.
func (c *liveCluster) index(id uint64) int {
	c.t.Helper()
	for i := range 3 {
		if s := c.ChunkServer(i); s != nil && s.ID() == id {
			return i
		}
	}
	c.t.Fatalf("no chunkserver %d", id)
	return -1
}

// chunkFile finds a chunk's file in chunkserver i's data directory.
func (c *liveCluster) chunkFile(i int, ch *mdspb.ChunkRef) string {
	c.t.Helper()
	dir := fmt.Sprintf("%d-%d", ch.Copyset.LogicalPoolId, ch.Copyset.CopysetId)
	var found string
	err := filepath.WalkDir(c.ChunkServerDir(i), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && d.Name() == fmt.Sprintf("chunk_%d", ch.ChunkId) && filepath.Base(filepath.Dir(filepath.Dir(path))) == dir {
			found = path
		}
		return nil
	})
	if err != nil || found == "" {
		c.t.Fatalf("chunk %d of copyset %s not found on chunkserver %d: %v", ch.ChunkId, dir, i, err)
	}
	return found
}

// TestLiveCluster runs the commands that need real chunkservers against a
// live cluster: status, check copyset, check consistency (finding a
// corruption planted straight into one replica's chunk file), query chunk,
// update leader, and what they say when a chunkserver stops.
func TestLiveCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster of three chunkservers")
	}
	c := startLive(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// A fresh cluster is healthy once the pools are formatted.
	var m map[string]any
	soon.Succeeds(t, time.Minute, func() error {
		r := c.run("-o", "json", "status")
		m = decodeJSON(t, r.stdout)
		if r.code != ExitOK {
			return fmt.Errorf("status exit %d: %v", r.code, jget(t, m, "problems"))
		}
		return nil
	})
	if jnum(t, m, "chunkservers.online") != 3 || jnum(t, m, "copysets.total") != 4 || jnum(t, m, "copysets.healthy") != 4 ||
		jnum(t, m, "space.disk_total_bytes") == 0 || jnum(t, m, "space.pool_free_bytes") == 0 || jnum(t, m, "formatting.target_chunks") == 0 {
		t.Errorf("status %v", m)
	}

	// A volume with data written through the chunk service.
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "128MiB")
	open, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "vol", Writable: true, Client: "live-test"})
	if err != nil {
		t.Fatal(err)
	}
	vol := open.Volume
	var chunks []*mdspb.ChunkRef
	for _, off := range []uint64{0, 64 << 20} {
		seg, err := c.Conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "vol", Offset: off, Allocate: true})
		if err != nil {
			t.Fatal(err)
		}
		chunks = append(chunks, seg.Segment.Chunks...)
	}
	cc := c.ChunkClient()
	rng := rand.New(rand.NewPCG(7, 7))
	written := []int{0, 1, 2, 9, 33, 64, 70, 127}
	for _, i := range written {
		data := make([]byte, 32<<10)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		off := uint64(i%8) * (64 << 10)
		st, err := cc.Write(ctx, chunks[i].Copyset, chunks[i].ChunkId, vol.Id, vol.Epoch, off, data)
		if err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write chunk %d: %v %v", chunks[i].ChunkId, st, err)
		}
	}

	// Every replica of every copyset answers, one leads, applied indexes
	// meet.
	soon.Succeeds(t, 30*time.Second, func() error {
		r := c.run("-o", "json", "check", "copyset")
		m = decodeJSON(t, r.stdout)
		if r.code != ExitOK {
			return fmt.Errorf("check copyset exit %d: %v", r.code, jget(t, m, "copysets"))
		}
		return nil
	})
	if jnum(t, m, "total") != 4 {
		t.Errorf("check copyset: %v", m)
	}
	for i := range 4 {
		p := fmt.Sprintf("copysets.%d", i)
		leaders := 0
		for j := range jlen(t, m, p+".replicas") {
			r := fmt.Sprintf("%s.replicas.%d", p, j)
			if jstr(t, m, r+".role") == "leader" {
				leaders++
				if jnum(t, m, r+".chunkserver_id") != jnum(t, m, p+".leader_id") {
					t.Errorf("%s: leader %v, replica %v", p, jnum(t, m, p+".leader_id"), jget(t, m, r))
				}
			}
			if jnum(t, m, r+".applied_index") == 0 || jlen(t, m, r+".peers") != 3 {
				t.Errorf("%s = %v", r, jget(t, m, r))
			}
		}
		if leaders != 1 {
			t.Errorf("%s has %d leaders", p, leaders)
		}
	}

	// All replicas agree.
	m = c.jsonRun(ExitOK, "check", "consistency", "vol")
	if jnum(t, m, "chunks") != 128 || jnum(t, m, "consistent") != 128 || jnum(t, m, "segments") != 2 {
		t.Fatalf("check consistency: %v", m)
	}
	// du: eight chunks written of 128 allocated in two segments.
	m = c.jsonRun(ExitOK, "du")
	if jlen(t, m, "volumes") != 1 || jstr(t, m, "volumes.0.name") != "vol" || jnum(t, m, "volumes.0.chunks_written") != 8 ||
		jnum(t, m, "volumes.0.chunks_allocated") != 128 || jnum(t, m, "volumes.0.chunks_unknown") != 0 ||
		jnum(t, m, "volumes.0.used_bytes") != 8*vol.ChunkSize || jnum(t, m, "volumes.0.allocated_bytes") != 128<<20 ||
		jnum(t, m, "volumes.0.provisioned_bytes") != 128<<20 || jnum(t, m, "total.used_bytes") != 8*vol.ChunkSize {
		t.Fatalf("du: %v", m)
	}
	du := c.run("du", "vol")
	if du.code != ExitOK || !strings.Contains(du.stdout, "8 of 128") {
		t.Fatalf("du vol: exit %d\n%s%s", du.code, du.stdout, du.stderr)
	}
	golden(t, "du_volume", du.stdout)
	if r := c.run("du", "nosuch"); r.code != ExitNotFound {
		t.Fatalf("du of an unknown volume: exit %d, want %d\n%s", r.code, ExitNotFound, r.stderr)
	}
	// delete --wait returns once the chunks are freed.
	c.jsonRun(ExitOK, "create", "volume", "scratch", "--size", "64MiB")
	so, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "scratch", Writable: true, Client: "live-test"})
	if err != nil {
		t.Fatal(err)
	}
	sseg, err := c.Conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "scratch", Offset: 0, Allocate: true})
	if err != nil {
		t.Fatal(err)
	}
	sc := sseg.Segment.Chunks[0]
	if st, err := cc.Write(ctx, sc.Copyset, sc.ChunkId, so.Volume.Id, so.Volume.Epoch, 0, make([]byte, 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("write scratch: %v %v", st, err)
	}
	m = c.jsonRun(ExitOK, "delete", "volume", "scratch", "--yes", "--force", "--wait", "60s")
	if !jbool(t, m, "freed") {
		t.Fatalf("delete --wait: %v", m)
	}
	vols, err := c.Conn.Volumes().ListVolumes(ctx, &mdspb.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vols.Volumes {
		if v.Id == so.Volume.Id {
			t.Fatalf("volume record %v left after delete --wait", v)
		}
	}
	// Also while writes are in flight: replicas at different applied
	// indexes are asked again until they meet, never compared.
	writerDone := make(chan error, 1)
	go func() {
		for n := range 150 {
			ch := chunks[written[n%len(written)]]
			st, err := cc.Write(ctx, ch.Copyset, ch.ChunkId, vol.Id, vol.Epoch, uint64(n%16)*4096, []byte(strings.Repeat(fmt.Sprintf("%07d\n", n), 512)))
			if err != nil || st != chunkpb.Status_STATUS_OK {
				writerDone <- fmt.Errorf("write %d: %v %v", n, st, err)
				return
			}
		}
		writerDone <- nil
	}()
	m = c.jsonRun(ExitOK, "check", "consistency", "vol", "--retries", "500", "--retry-interval", "20ms")
	if err := <-writerDone; err != nil {
		t.Fatal(err)
	}
	if jnum(t, m, "consistent") != 128 {
		t.Fatalf("check consistency during writes: %v", m)
	}

	// The listings and the volume, as the live cluster has them.
	// Online state comes from heartbeat age, which a stalled machine can
	// briefly push past the cluster's short unstable timeout: poll.
	soon.Succeeds(t, 30*time.Second, func() error {
		m := c.jsonRun(ExitOK, "list", "chunkserver")
		copysets := uint64(0)
		for i := range jlen(t, m, "chunkservers") {
			p := fmt.Sprintf("chunkservers.%d", i)
			if jstr(t, m, p+".online_state") != "online" || jnum(t, m, p+".pool_target_chunks") == 0 {
				return fmt.Errorf("%s = %v", p, jget(t, m, p))
			}
			copysets += jnum(t, m, p+".copysets")
		}
		if copysets != 12 {
			return fmt.Errorf("chunkservers hold %d copyset replicas, want 12", copysets)
		}
		return nil
	})
	if m = c.jsonRun(ExitOK, "list", "zone"); jlen(t, m, "zones") != 3 {
		t.Errorf("zones: %v", m)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		if m := c.jsonRun(ExitOK, "list", "copyset"); jlen(t, m, "copysets") != 4 || !jbool(t, m, "copysets.3.healthy") {
			return fmt.Errorf("copysets: %v", m)
		}
		return nil
	})
	m = c.jsonRun(ExitOK, "query", "volume", "vol")
	if jnum(t, m, "volume.epoch") != vol.Epoch || jnum(t, m, "volume.allocated_segments") != 2 ||
		jlen(t, m, "sessions") != 1 || jstr(t, m, "sessions.0.client") != "live-test" || !jbool(t, m, "sessions.0.writable") {
		t.Errorf("query volume: %v", m)
	}

	// query chunk names the chunk, its copyset and its replicas.
	target := chunks[70]
	m = c.jsonRun(ExitOK, "query", "chunk", "vol", strconv.Itoa(70<<20+12345))
	if jnum(t, m, "chunk_id") != target.ChunkId || jstr(t, m, "copyset") != target.Copyset.Name() ||
		jlen(t, m, "replicas") != 3 || jnum(t, m, "chunk_offset") != 12345 {
		t.Errorf("query chunk: %v", m)
	}

	// Plant a corruption in one replica's chunk file, on disk.
	victim := 1
	victimID := c.ChunkServer(victim).ID()
	path := c.chunkFile(victim, target)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("bit rot"), int64(4096)+(6*64<<10)+100); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	r := c.run("-o", "json", "check", "consistency", "vol")
	if r.code != ExitInconsistent {
		t.Fatalf("check consistency after corruption: exit %d, want %d\n%s%s", r.code, ExitInconsistent, r.stdout, r.stderr)
	}
	m = decodeJSON(t, r.stdout)
	if jnum(t, m, "mismatched") != 1 || jnum(t, m, "consistent") != 127 || jnum(t, m, "problems.0.chunk_id") != target.ChunkId {
		t.Fatalf("report %v", m)
	}
	var differs []uint64
	for j := range jlen(t, m, "problems.0.replicas") {
		rp := fmt.Sprintf("problems.0.replicas.%d", j)
		if jbool(t, m, rp+".differs") {
			differs = append(differs, jnum(t, m, rp+".chunkserver_id"))
		}
	}
	if !slices.Equal(differs, []uint64{victimID}) {
		t.Errorf("replicas differing %v, want [%d]", differs, victimID)
	}
	r = c.run("check", "consistency", "vol")
	want := fmt.Sprintf("chunkserver %d (%s) has crc32c", victimID, c.ChunkServer(victim).Addr())
	if r.code != ExitInconsistent || !strings.Contains(r.stdout, want) || !strings.Contains(r.stdout, fmt.Sprintf("\n%d ", target.ChunkId)) {
		t.Errorf("table does not name chunk %d and %q:\n%s", target.ChunkId, want, r.stdout)
	}

	// Move a copyset's leadership to a follower and wait for it.
	cs := c.leaderOf(ctx, target)
	to := uint64(0)
	for _, p := range cs.Peers {
		if p.ChunkserverId != cs.LeaderId {
			to = p.ChunkserverId
			break
		}
	}
	m = c.jsonRun(ExitOK, "update", "leader", "--copyset", cs.Id.Name(), "--to", strconv.FormatUint(to, 10), "--wait", "30s")
	if !jbool(t, m, "done") || jnum(t, m, "from") != cs.LeaderId {
		t.Errorf("update leader: %v", m)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		m := c.jsonRun(ExitOK, "check", "copyset", cs.Id.Name())
		if got := jnum(t, m, "copysets.0.leader_id"); got != to {
			return fmt.Errorf("chunkservers say %d leads", got)
		}
		return nil
	})

	// A chunkserver stops: its replicas do not answer, then it is offline.
	stopped := c.index(to)
	stoppedAddr := c.ChunkServer(stopped).Addr()
	c.StopChunkServer(stopped)
	r = c.run("-o", "json", "--timeout", "2s", "check", "copyset")
	if r.code != ExitUnhealthy {
		t.Fatalf("check copyset with a chunkserver down: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	m = decodeJSON(t, r.stdout)
	if jnum(t, m, "unhealthy") != 4 {
		t.Errorf("%d unhealthy copysets, want 4", jnum(t, m, "unhealthy"))
	}
	if !slices.Contains(jstrings(t, m, "copysets.0.reasons"), reasonReplicaUnreachable) ||
		!strings.Contains(strings.Join(jstrings(t, m, "copysets.0.problems"), "\n"), fmt.Sprintf("chunkserver %d (%s) did not answer", to, stoppedAddr)) {
		t.Errorf("copyset 0: %v", jget(t, m, "copysets.0"))
	}
	soon.Succeeds(t, time.Minute, func() error {
		r := c.run("-o", "json", "status")
		m = decodeJSON(t, r.stdout)
		if r.code != ExitUnhealthy || jnum(t, m, "chunkservers.offline") != 1 || jnum(t, m, "copysets.by_reason.peers_offline") != 4 {
			return fmt.Errorf("status exit %d: %v", r.code, jget(t, m, "problems"))
		}
		return nil
	})
	// With a replica gone no chunk can be compared on all replicas: every
	// chunk is unverified and the missing replica is named.
	r = c.run("-o", "json", "--timeout", "2s", "check", "consistency", "vol", "--retries", "1", "--retry-interval", "10ms")
	if r.code != ExitUnhealthy {
		t.Fatalf("check consistency with a chunkserver down: exit %d, want %d\n%s", r.code, ExitUnhealthy, r.stdout)
	}
	m = decodeJSON(t, r.stdout)
	if jnum(t, m, "unverified") != 128 || !strings.Contains(jstr(t, m, "problems.0.problem"), fmt.Sprintf("chunkserver %d (%s)", to, stoppedAddr)) {
		t.Errorf("report %v", jget(t, m, "problems.0"))
	}
}

// leaderOf returns the MDS's record of a chunk's copyset.
func (c *liveCluster) leaderOf(ctx context.Context, ch *mdspb.ChunkRef) *mdspb.Copyset {
	c.t.Helper()
	resp, err := c.Conn.Topology().GetCopysets(ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{ch.Copyset}})
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.Copysets[0]
}

// BenchmarkCheckConsistency measures check consistency over a volume whose
// 32 chunks of 1 MiB are fully written, on a live three-chunkserver cluster:
// bytes/s counts the data hashed on all three replicas.
//
//	go test -run X -bench CheckConsistency ./tools/ops
func BenchmarkCheckConsistency(b *testing.B) {
	c := cluster.Start(b, cluster.Options{CopysetsPerChunkServer: 4, SegmentSize: 32 << 20})
	ctx := context.Background()
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "bench", Size: 32 << 20}); err != nil {
		b.Fatal(err)
	}
	open, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "bench", Writable: true})
	if err != nil {
		b.Fatal(err)
	}
	seg, err := c.Conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "bench", Offset: 0, Allocate: true})
	if err != nil {
		b.Fatal(err)
	}
	cc := c.ChunkClient()
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	for _, ch := range seg.Segment.Chunks {
		for off := 0; off < len(data); off += 128 << 10 { // writes to a 1 MiB chunk stay under a quarter of it
			st, err := cc.Write(ctx, ch.Copyset, ch.ChunkId, open.Volume.Id, open.Volume.Epoch, uint64(off), data[off:off+128<<10])
			if err != nil || st != chunkpb.Status_STATUS_OK {
				b.Fatalf("write: %v %v", st, err)
			}
		}
	}
	args := []string{"--insecure", "--mds", c.MDS.Addr(), "check", "consistency", "bench"}
	b.SetBytes(int64(len(seg.Segment.Chunks)) * (1 << 20) * 3)
	b.ResetTimer()
	for range b.N {
		var out, errb strings.Builder
		if code := RunWithInput(ctx, args, strings.NewReader(""), &out, &errb); code != ExitOK {
			b.Fatalf("exit %d: %s%s", code, out.String(), errb.String())
		}
	}
	b.ReportMetric(float64(len(seg.Segment.Chunks)*b.N)/b.Elapsed().Seconds(), "chunks/s")
}
