package chunkserver_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/chunkserver"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// volume is a test volume opened for writing with one allocated segment.
type volume struct {
	id     uint64
	epoch  uint64
	chunks []*mdspb.ChunkRef
}

func openVolume(t *testing.T, c *cluster.Cluster, name string) volume {
	t.Helper()
	ctx := context.Background()
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: name, Size: 64 << 20, Owner: "test"}); err != nil {
		t.Fatalf("create volume: %v", err)
	}
	o, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: name, Writable: true, Client: "test"})
	if err != nil {
		t.Fatalf("open volume: %v", err)
	}
	seg, err := c.Conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: name, Offset: 0, Allocate: true})
	if err != nil {
		t.Fatalf("allocate segment: %v", err)
	}
	return volume{id: o.GetVolume().GetId(), epoch: o.GetVolume().GetEpoch(), chunks: seg.GetSegment().GetChunks()}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func pattern(tag string, n int) []byte {
	return bytes.Repeat([]byte(tag), n/len(tag)+1)[:n]
}

func TestWriteReadAndRedirect(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	v := openVolume(t, c, "v1")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	ch := v.chunks[0]
	data := pattern("cairn|", 8192)
	if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 4096, data); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("write: %v %v", st, err)
	}
	got, st, err := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, 0, 4096+8192+512)
	if err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("read: %v %v", st, err)
	}
	want := append(append(make([]byte, 4096), data...), make([]byte, 512)...)
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs from what was written")
	}
	// An unwritten chunk: CHUNK_NOTEXIST.
	other := v.chunks[1]
	_, st, err = cc.Read(ctx, other.GetCopyset(), other.GetChunkId(), v.id, 0, 512)
	if err != nil || st != chunkpb.Status_STATUS_CHUNK_NOTEXIST {
		t.Fatalf("read of a never-written chunk: %v %v", st, err)
	}

	// Every follower redirects to the leader, naming its id and address.
	leaderAddr, err := cc.Leader(ctx, ch.GetCopyset())
	if err != nil {
		t.Fatal(err)
	}
	var leaderID uint64
	for _, s := range c.ChunkServers() {
		if s.Addr() == leaderAddr {
			leaderID = s.ID()
		}
	}
	followers := 0
	for _, s := range c.ChunkServers() {
		if s.Addr() == leaderAddr {
			continue
		}
		r, err := cc.Client(s.Addr()).WriteChunk(ctx, &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Offset: 0, Data: make([]byte, 512)})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetStatus() == chunkpb.Status_STATUS_REDIRECTED {
			followers++
			if r.GetLeader().GetChunkserverId() != leaderID || r.GetLeader().GetAddress() != leaderAddr {
				t.Fatalf("redirect names %v, want %d at %s", r.GetLeader(), leaderID, leaderAddr)
			}
		}
		rr, err := cc.Client(s.Addr()).ReadChunk(ctx, &chunkpb.ReadChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Offset: 0, Length: 512})
		if err != nil {
			t.Fatal(err)
		}
		if rr.GetStatus() != chunkpb.Status_STATUS_REDIRECTED || rr.GetLeader().GetAddress() != leaderAddr {
			t.Fatalf("read on a follower: %v %v", rr.GetStatus(), rr.GetLeader())
		}
	}
	if followers != 2 {
		t.Fatalf("%d followers redirected, want 2", followers)
	}
	// The follower's refused write changed nothing.
	got, _, _ = cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, 4096, 8192)
	if !bytes.Equal(got, data) {
		t.Fatal("data changed after refused writes")
	}
}

func TestMalformedRequestsChangeNothing(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	v := openVolume(t, c, "v2")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	ch := v.chunks[0]
	orig := pattern("orig|", 1<<20)
	for off := 0; off < 1<<20; off += 128 << 10 {
		if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, uint64(off), orig[off:off+128<<10]); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write: %v %v", st, err)
		}
	}
	addr, _ := cc.Leader(ctx, ch.GetCopyset())
	leader := cc.Client(addr)
	cases := []struct {
		name string
		req  *chunkpb.WriteChunkRequest
		want chunkpb.Status
	}{
		{"no copyset", &chunkpb.WriteChunkRequest{ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Data: make([]byte, 512)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"unknown copyset", &chunkpb.WriteChunkRequest{Copyset: &commonpb.CopysetRef{LogicalPoolId: 99, CopysetId: 1}, ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Data: make([]byte, 512)}, chunkpb.Status_STATUS_COPYSET_NOTEXIST},
		{"no chunk id", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), VolumeId: v.id, Epoch: v.epoch, Data: make([]byte, 512)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"unaligned offset", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Offset: 100, Data: make([]byte, 512)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"unaligned length", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Data: make([]byte, 700)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"empty payload", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"past the chunk end", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Offset: 1<<20 - 512, Data: make([]byte, 1024)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"offset beyond the chunk", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Offset: 4 << 20, Data: make([]byte, 512)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"oversized payload", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch, Data: make([]byte, 1<<20)}, chunkpb.Status_STATUS_INVALID_REQUEST},
		{"no volume", &chunkpb.WriteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), Epoch: v.epoch, Data: make([]byte, 512)}, chunkpb.Status_STATUS_INVALID_REQUEST},
	}
	for _, tc := range cases {
		r, err := leader.WriteChunk(ctx, tc.req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if r.GetStatus() != tc.want || r.GetMessage() == "" {
			t.Errorf("%s: status %v (%q), want %v with a message", tc.name, r.GetStatus(), r.GetMessage(), tc.want)
		}
	}
	for _, rq := range []*chunkpb.ReadChunkRequest{
		{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Offset: 1, Length: 512},
		{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Offset: 0, Length: 0},
		{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Offset: 1 << 20, Length: 512},
	} {
		r, err := leader.ReadChunk(ctx, rq)
		if err != nil || r.GetStatus() != chunkpb.Status_STATUS_INVALID_REQUEST || len(r.GetData()) != 0 {
			t.Errorf("read %v: %v %v", rq, r.GetStatus(), err)
		}
	}
	for off := 0; off < 1<<20; off += 128 << 10 {
		got, st, err := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, uint64(off), 128<<10)
		if err != nil || st != chunkpb.Status_STATUS_OK || !bytes.Equal(got, orig[off:off+128<<10]) {
			t.Fatalf("a refused request changed the chunk at %d (%v %v)", off, st, err)
		}
	}
	for _, s := range c.ChunkServers() {
		for _, cs := range s.Engine().List() {
			if cs.ID().Pool() == 99 {
				t.Fatal("a request created a copyset")
			}
		}
	}
}

func TestStaleEpochRefusedAndChangesNothing(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	v := openVolume(t, c, "v3")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	ch := v.chunks[2]
	first := pattern("first|", 4096)
	if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 0, first); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("write: %v %v", st, err)
	}
	// Another client opens the volume for writing: the epoch moves on and
	// every chunkserver learns it before the open returns.
	o, err := c.Conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "v3", Writable: true, Client: "second"})
	if err != nil {
		t.Fatal(err)
	}
	if o.GetVolume().GetEpoch() <= v.epoch {
		t.Fatalf("epoch did not move: %d -> %d", v.epoch, o.GetVolume().GetEpoch())
	}
	st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 0, pattern("stale|", 4096))
	if err != nil || st != chunkpb.Status_STATUS_EPOCH_TOO_OLD {
		t.Fatalf("write with the old epoch: %v %v, want EPOCH_TOO_OLD", st, err)
	}
	st, err = c.ChunkClient().Do(ctx, ch.GetCopyset(), func(cl chunkpb.ChunkServiceClient) (chunkpb.Status, *chunkpb.LeaderHint, error) {
		r, err := cl.DeleteChunk(ctx, &chunkpb.DeleteChunkRequest{Copyset: ch.GetCopyset(), ChunkId: ch.GetChunkId(), VolumeId: v.id, Epoch: v.epoch})
		return r.GetStatus(), r.GetLeader(), err
	})
	if err != nil || st != chunkpb.Status_STATUS_EPOCH_TOO_OLD {
		t.Fatalf("delete with the old epoch: %v %v", st, err)
	}
	got, _, _ := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, 0, 4096)
	if !bytes.Equal(got, first) {
		t.Fatal("a fenced write changed the chunk")
	}
	// The new opener writes fine.
	if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, o.GetVolume().GetEpoch(), 0, pattern("new|", 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatalf("write with the new epoch: %v %v", st, err)
	}
	// The epoch survives a restart of the chunkservers.
	for i := range c.ChunkServers() {
		c.StopChunkServer(i)
		c.StartChunkServer(i)
	}
	st, err = cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 0, pattern("stale|", 4096))
	if err != nil || st != chunkpb.Status_STATUS_EPOCH_TOO_OLD {
		t.Fatalf("after restart, write with the old epoch: %v %v", st, err)
	}
}

func TestRestartKeepsIdentityAndData(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	v := openVolume(t, c, "v4")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	for i, ch := range v.chunks[:6] {
		if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, uint64(i)*4096, pattern(fmt.Sprint(i, "|"), 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write: %v %v", st, err)
		}
	}
	ids := map[int]uint64{}
	for i := 0; i < 3; i++ {
		ids[i] = c.ChunkServer(i).ID()
	}
	for i := 0; i < 3; i++ {
		c.StopChunkServer(i)
	}
	for i := 0; i < 3; i++ {
		if s := c.StartChunkServer(i); s.ID() != ids[i] {
			t.Fatalf("chunkserver %d came back as id %d, was %d", i, s.ID(), ids[i])
		}
	}
	resp, err := c.Conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	if err != nil || len(resp.GetChunkservers()) != 3 {
		t.Fatalf("MDS lists %d chunkservers after restarts (%v), want 3", len(resp.GetChunkservers()), err)
	}
	for i, ch := range v.chunks[:6] {
		got, _, err := cc.Read(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, uint64(i)*4096, 4096)
		if err != nil || !bytes.Equal(got, pattern(fmt.Sprint(i, "|"), 4096)) {
			t.Fatalf("chunk %d lost after restart: %v", ch.GetChunkId(), err)
		}
	}
}

func TestHeartbeatsReportCopysetsAndCapacity(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	ctx := ctxT(t)
	soon.Succeeds(t, 30*time.Second, func() error {
		resp, err := c.Conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
		if err != nil {
			return err
		}
		leaders := 0
		for _, cs := range resp.GetChunkservers() {
			if cs.GetOnlineState() != mdspb.OnlineState_ONLINE_STATE_ONLINE {
				return fmt.Errorf("chunkserver %d is %v", cs.GetId(), cs.GetOnlineState())
			}
			if cs.GetCapacity().GetPoolTargetChunks() == 0 || cs.GetCapacity().GetDiskTotalBytes() == 0 {
				return fmt.Errorf("chunkserver %d reports no capacity: %v", cs.GetId(), cs.GetCapacity())
			}
			if cs.GetCopysetCount() != 8 {
				return fmt.Errorf("chunkserver %d reports %d copysets, want 8", cs.GetId(), cs.GetCopysetCount())
			}
			leaders += int(cs.GetLeaderCount())
		}
		if leaders != 8 {
			return fmt.Errorf("%d leaders reported over 8 copysets", leaders)
		}
		return nil
	})
	// CopysetService answers for every copyset, with the leader's progress.
	s := c.ChunkServer(0)
	conn, err := grpc.NewClient(s.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := copysetpb.NewCopysetServiceClient(conn).GetCopysetStatus(ctx, &copysetpb.GetCopysetStatusRequest{})
	if err != nil || len(st.GetCopysets()) != 8 {
		t.Fatalf("copyset status: %d copysets, %v", len(st.GetCopysets()), err)
	}
	for _, cs := range st.GetCopysets() {
		if len(cs.GetPeers()) != 3 || cs.GetLeaderId() == 0 || cs.GetAppliedIndex() == 0 {
			t.Fatalf("copyset status incomplete: %v", cs)
		}
		if cs.GetRole() == copysetpb.Role_ROLE_LEADER && len(cs.GetProgress()) != 3 {
			t.Fatalf("leader reports progress of %d peers", len(cs.GetProgress()))
		}
	}
}

func TestTransferLeaderOperator(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	ctx := ctxT(t)
	list, err := c.Conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	cs := list.GetCopysets()[0]
	var to uint64
	for _, p := range cs.GetPeers() {
		if p.GetChunkserverId() != cs.GetLeaderId() {
			to = p.GetChunkserverId()
			break
		}
	}
	if _, err := c.Conn.Cluster().TransferLeader(ctx, &mdspb.TransferLeaderRequest{Copyset: cs.GetId(), ToChunkserverId: to}); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		r, err := c.Conn.Topology().GetCopysets(ctx, &mdspb.GetCopysetsRequest{Copysets: []*commonpb.CopysetRef{cs.GetId()}})
		if err != nil {
			return err
		}
		if l := r.GetCopysets()[0].GetLeaderId(); l != to {
			return fmt.Errorf("leader is %d, want %d", l, to)
		}
		return nil
	})
}

func TestMetricsEndpoint(t *testing.T) {
	c := cluster.Start(t, cluster.Options{Tune: func(i int, cfg *chunkserver.Config) { cfg.MetricsAddr = "127.0.0.1:0" }})
	v := openVolume(t, c, "v5")
	ch := v.chunks[0]
	if st, err := c.ChunkClient().Write(ctxT(t), ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 0, make([]byte, 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatal(st, err)
	}
	if _, st, err := c.ChunkClient().Read(ctxT(t), ch.GetCopyset(), ch.GetChunkId(), v.id, 0, 8192); err != nil || st != chunkpb.Status_STATUS_OK {
		t.Fatal(st, err)
	}
	// A refused write (naming no volume) moves no bytes.
	if st, err := c.ChunkClient().Write(ctxT(t), ch.GetCopyset(), ch.GetChunkId(), 0, v.epoch, 0, make([]byte, 4096)); err != nil || st != chunkpb.Status_STATUS_INVALID_REQUEST {
		t.Fatal("write naming no volume:", st, err)
	}
	var body string
	for _, s := range c.ChunkServers() {
		resp, err := http.Get("http://" + s.MetricsAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body += string(b)
	}
	for _, want := range []string{
		`cairn_chunkserver_requests_total{op="write",status="ok"} 1`,
		`cairn_chunkserver_request_bytes_total{op="write"} 4096`,
		`cairn_chunkserver_request_bytes_total{op="read"} 8192`,
		"cairn_chunkserver_wal_fsync_duration_seconds_bucket",
		"cairn_chunkserver_wal_entries_per_fsync_count",
		"cairn_chunkserver_proposal_commit_duration_seconds_count 1",
		"cairn_chunkserver_proposal_apply_duration_seconds_count 1",
		"cairn_chunkserver_pool_free_chunks",
		"cairn_chunkserver_pool_growable_chunks",
		"cairn_chunkserver_pool_format_ratio",
		"cairn_chunkserver_leader_changes_total",
		"cairn_chunkserver_snapshots_sent_total",
		"cairn_chunkserver_apply_lag_entries",
		"cairn_chunkserver_raft_heartbeats_sent_total",
		"cairn_chunkserver_copysets 8",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Correct peers never send what the transport's checks refuse.
	if n := strings.Count(body, "\ncairn_chunkserver_raft_messages_refused_total 0\n"); n != 3 {
		t.Errorf("%d of 3 chunkservers report no refused Raft messages", n)
	}
}

func TestRegistrationRefusesOtherGeometry(t *testing.T) {
	c := cluster.Start(t, cluster.Options{NoPool: true})
	cfg := c.ChunkServerConfig(0)
	cfg.DataDir = t.TempDir()
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.Zone, cfg.Hostname = "zone9", "host9"
	cfg.ChunkSize = 2 << 20
	s, err := chunkserver.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Start(ctxT(t))
	if err == nil {
		s.Stop()
		t.Fatal("a chunkserver with 2 MiB chunks joined a 1 MiB cluster")
	}
	if !strings.Contains(err.Error(), "chunk") {
		t.Fatalf("refusal does not say what differs: %v", err)
	}
	resp, _ := c.Conn.Topology().ListChunkServers(ctxT(t), &mdspb.ListChunkServersRequest{})
	if len(resp.GetChunkservers()) != 3 {
		t.Fatalf("%d chunkservers registered after a refusal, want 3", len(resp.GetChunkservers()))
	}
}
