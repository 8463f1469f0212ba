package chunkserver_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

// replicaStatus asks chunkserver i for its replica of a copyset (nil when
// it does not host one).
func replicaStatus(ctx context.Context, c *cluster.Cluster, i int, ref *commonpb.CopysetRef) (*copysetpb.CopysetStatus, error) {
	s := c.ChunkServer(i)
	if s == nil {
		return nil, fmt.Errorf("chunkserver %d is stopped", i)
	}
	conn, err := grpc.NewClient(s.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp, err := copysetpb.NewCopysetServiceClient(conn).GetCopysetStatus(ctx, &copysetpb.GetCopysetStatusRequest{Copysets: []*commonpb.CopysetRef{ref}})
	if err != nil {
		return nil, err
	}
	if len(resp.GetCopysets()) == 0 {
		return nil, nil
	}
	return resp.GetCopysets()[0], nil
}

// replicaHash is the CRC32C of a chunk on chunkserver i's replica and the
// applied index it was taken at.
func replicaHash(ctx context.Context, c *cluster.Cluster, i int, ref *commonpb.CopysetRef, chunk uint64) (uint32, uint64, error) {
	s := c.ChunkServer(i)
	conn, err := grpc.NewClient(s.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return 0, 0, err
	}
	defer conn.Close()
	resp, err := chunkpb.NewChunkServiceClient(conn).GetChunkHash(ctx, &chunkpb.GetChunkHashRequest{Copyset: ref, ChunkId: chunk})
	if err != nil {
		return 0, 0, err
	}
	if resp.GetStatus() != chunkpb.Status_STATUS_OK {
		return 0, 0, fmt.Errorf("hash on chunkserver %d: %v %s", i, resp.GetStatus(), resp.GetMessage())
	}
	return resp.GetCrc32C(), resp.GetAppliedIndex(), nil
}

// TestBrokenReplicaIsRebuiltFromItsPeers damages one replica's checkpoint
// file while its chunkserver is down. The chunkserver comes back with that
// replica broken instead of refusing to start; the copyset keeps serving on
// its two other replicas; the MDS removes the broken replica and adds the
// chunkserver back, and the new replica is filled from its peers until it
// holds the same data.
func TestBrokenReplicaIsRebuiltFromItsPeers(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	c.WaitHealthy()
	v := openVolume(t, c, "rebuild")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	ch := v.chunks[0]
	ref := ch.GetCopyset()
	for k := range 8 {
		if st, err := cc.Write(ctx, ref, ch.GetChunkId(), v.id, v.epoch, uint64(k)*4096, pattern(fmt.Sprintf("before%d|", k), 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write: %v %v", st, err)
		}
	}
	// The victim: a replica that does not lead.
	victim := -1
	for i := range 3 {
		st, err := replicaStatus(ctx, c, i, ref)
		if err == nil && st != nil && st.GetRole() != copysetpb.Role_ROLE_LEADER {
			victim = i
			break
		}
	}
	if victim < 0 {
		t.Fatal("no follower replica found")
	}
	victimID := c.ChunkServer(victim).ID()
	c.StopChunkServer(victim)
	meta := filepath.Join(c.ChunkServerDir(victim), "engine", "copysets", fmt.Sprintf("%d-%d", ref.GetLogicalPoolId(), ref.GetCopysetId()), "raft.meta")
	if err := os.WriteFile(meta, []byte(`{"version":1,"crc":1}`), 0o644); err != nil {
		t.Fatal(err)
	}
	c.StartChunkServer(victim)

	// It reports the replica broken (or has already had it replaced).
	// Meanwhile the copyset serves writes on its two other replicas.
	for k := 8; k < 16; k++ {
		if st, err := cc.Write(ctx, ref, ch.GetChunkId(), v.id, v.epoch, uint64(k)*4096, pattern(fmt.Sprintf("during%d|", k), 4096)); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write while a replica is broken: %v %v", st, err)
		}
	}
	// Rebuilt: the victim is a healthy voting member again...
	soon.Succeeds(t, 90*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := replicaStatus(ctx, c, victim, ref)
		switch {
		case err != nil:
			return err
		case st == nil:
			return fmt.Errorf("chunkserver %d hosts no replica", victimID)
		case st.GetBroken() != "":
			return fmt.Errorf("replica still broken: %s", st.GetBroken())
		case !slices.ContainsFunc(st.GetPeers(), func(p *commonpb.Peer) bool { return p.GetChunkserverId() == victimID }):
			return fmt.Errorf("chunkserver %d is not a voter yet (peers %v, learners %v)", victimID, st.GetPeers(), st.GetLearners())
		}
		return nil
	})
	// ...holding exactly what its peers hold.
	soon.Succeeds(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var sums []uint32
		var idx []uint64
		for i := range 3 {
			sum, applied, err := replicaHash(ctx, c, i, ref, ch.GetChunkId())
			if err != nil {
				return err
			}
			sums, idx = append(sums, sum), append(idx, applied)
		}
		if idx[0] != idx[1] || idx[1] != idx[2] {
			return fmt.Errorf("replicas at applied indexes %v", idx)
		}
		if sums[0] != sums[1] || sums[1] != sums[2] {
			return fmt.Errorf("replicas differ at applied index %d: crc %v", idx[0], sums)
		}
		return nil
	})
}

// TestDamagedWALRebuildsEveryReplica damages a record in the middle of a
// chunkserver's write-ahead log while it is down. Entries it made durable,
// of copysets it cannot tell, are gone, so it cannot trust any of its
// replicas: it starts with every one broken (the damaged log kept aside),
// and the MDS rebuilds each from its peers.
func TestDamagedWALRebuildsEveryReplica(t *testing.T) {
	c := cluster.Start(t, cluster.Options{})
	c.WaitHealthy()
	v := openVolume(t, c, "walrot")
	cc := c.ChunkClient()
	ctx := ctxT(t)
	for i, ch := range v.chunks[:8] {
		if st, err := cc.Write(ctx, ch.GetCopyset(), ch.GetChunkId(), v.id, v.epoch, 0, pattern(fmt.Sprintf("w%d|", i), 8192)); err != nil || st != chunkpb.Status_STATUS_OK {
			t.Fatalf("write: %v %v", st, err)
		}
	}
	const victim = 1
	victimID := c.ChunkServer(victim).ID()
	c.StopChunkServer(victim)
	segs, err := filepath.Glob(filepath.Join(c.ChunkServerDir(victim), "engine", "wal", "0*.wal"))
	if err != nil || len(segs) == 0 {
		t.Fatalf("no WAL segment found: %v", err)
	}
	slices.Sort(segs)
	f, err := os.OpenFile(segs[len(segs)-1], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := []byte{0}
	const at = 4096 + 17 + 40 // inside the first record's payload
	if _, err := f.ReadAt(b, at); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x20
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c.StartChunkServer(victim)
	if m, _ := filepath.Glob(filepath.Join(c.ChunkServerDir(victim), "engine", "wal.damaged-*")); len(m) != 1 {
		t.Fatalf("damaged log not kept aside: %v", m)
	}
	// Every replica on the victim comes back as a healthy voter.
	list, err := c.Conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 3*time.Minute, func() error {
		for _, cs := range list.GetCopysets() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			st, err := replicaStatus(sctx, c, victim, cs.GetId())
			cancel()
			switch {
			case err != nil:
				return err
			case st == nil || st.GetBroken() != "":
				return fmt.Errorf("copyset %v not rebuilt yet on chunkserver %d", cs.GetId(), victimID)
			case !slices.ContainsFunc(st.GetPeers(), func(p *commonpb.Peer) bool { return p.GetChunkserverId() == victimID }):
				return fmt.Errorf("chunkserver %d is not yet a voter of copyset %v", victimID, cs.GetId())
			}
		}
		return nil
	})
	rctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, ch := range v.chunks[:8] {
		got, st, err := cc.Read(rctx, ch.GetCopyset(), ch.GetChunkId(), v.id, 0, 8192)
		if err != nil || st != chunkpb.Status_STATUS_OK || !bytes.Equal(got, pattern(fmt.Sprintf("w%d|", i), 8192)) {
			t.Fatalf("chunk %d after the rebuild: %v %v", i, st, err)
		}
	}
}
