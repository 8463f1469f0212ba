package security

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.etcd.io/raft/v3/raftpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/api/transportpb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/internal/wire"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/test/cluster"
)

// startCluster starts a TLS cluster with a 64 MiB volume "vol".
func startCluster(t *testing.T) *cluster.Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a cluster")
	}
	c := cluster.Start(t, cluster.Options{TLS: true, CopysetsPerChunkServer: 4})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "vol", Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	return c
}

// dialMDS connects to the cluster's MDS as id (nil: plaintext), with a
// short retry budget.
func dialMDS(t *testing.T, c *cluster.Cluster, id *certs.Source) *mdsclient.Conn {
	t.Helper()
	conn, err := mdsclient.Dial([]string{c.MDS.Addr()}, mdsclient.Options{TLS: id, RetryBudget: 3 * time.Second, Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// follower returns a chunkserver and a copyset it follows.
func follower(t *testing.T, c *cluster.Cluster) (int, *copyset.Copyset) {
	t.Helper()
	for i, s := range c.ChunkServers() {
		for _, cs := range s.Engine().List() {
			if cs.Leader() != 0 && !cs.IsLeader() {
				return i, cs
			}
		}
	}
	t.Fatal("no copyset with a known leader")
	return 0, nil
}

// forgedHeartbeat is a heartbeat from the copyset's leader with a term far
// ahead: a replica that took it would step down to follow term+100.
func forgedHeartbeat(cs *copyset.Copyset, to uint64, term uint64) *transportpb.RaftBatch {
	return &transportpb.RaftBatch{From: cs.Leader(), To: to, Heartbeats: []*transportpb.Heartbeat{{
		Group: uint64(cs.ID()), Term: term + 100, Commit: 0,
	}}}
}

func termOf(t *testing.T, cs *copyset.Copyset) uint64 {
	t.Helper()
	st, err := cs.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st.Term
}

// sendRaft sends one Raft batch over the wire protocol as id (nil:
// plaintext) and reports whether the chunkserver kept the connection (it
// closes a connection whose message it refuses).
func sendRaft(t *testing.T, addr string, id *certs.Source, b *transportpb.RaftBatch) (kept bool, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := wire.Dial(ctx, addr, wire.ClientOptions{Dialer: certs.Dialer(id, certs.RoleChunkServer)})
	if err != nil {
		return false, err
	}
	defer cl.Close()
	if err := cl.Send(transportpb.WireRaftBatch, b); err != nil {
		return false, err
	}
	select {
	case <-cl.Done():
		return false, cl.Err()
	case <-time.After(time.Second):
		return true, nil
	}
}

// TestOnlyChunkServersSpeakRaft: a forged heartbeat with a higher term
// reaches a follower's Raft only from a certificate of the chunkserver
// role that names the host of the chunkserver it claims to be. From a
// plaintext connection (the handshake fails), a client's certificate, a
// chunkserver's certificate of another host, or in the name of a
// chunkserver the MDS does not know (the message is refused and the
// connection closed) nothing changes; from a chunkserver's certificate for
// this host the same message is taken (the term moves: the checks are what
// stop the others).
func TestOnlyChunkServersSpeakRaft(t *testing.T) {
	c := startCluster(t)
	i, cs := follower(t, c)
	s := c.ChunkServer(i)
	before := termOf(t, cs)

	if _, err := sendRaft(t, s.Addr(), nil, forgedHeartbeat(cs, s.ID(), before)); err == nil {
		t.Fatal("a plaintext connection to a TLS chunkserver spoke the wire protocol")
	}
	kept, err := sendRaft(t, s.Addr(), c.Identity(certs.RoleClient), forgedHeartbeat(cs, s.ID(), before))
	if kept {
		t.Fatal("a Raft batch from a client's certificate was taken")
	}
	t.Logf("client's Raft batch: connection closed (%v)", err)
	// A chunkserver's certificate for another host may not speak for a
	// chunkserver registered here, nor may any speak for one the MDS does
	// not know.
	elsewhere, err := certs.Load(c.Issue("cs-elsewhere", certs.Request{Roles: []certs.Role{certs.RoleChunkServer}, Hosts: []string{"10.9.9.9"}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	if kept, _ := sendRaft(t, s.Addr(), elsewhere, forgedHeartbeat(cs, s.ID(), before)); kept {
		t.Fatal("a chunkserver certificate of another host spoke for the leader")
	}
	unknown := forgedHeartbeat(cs, s.ID(), before)
	unknown.From = 9999
	if kept, _ := sendRaft(t, s.Addr(), c.Identity(certs.RoleChunkServer), unknown); kept {
		t.Fatal("a batch from a chunkserver the MDS does not know was taken")
	}
	if got := termOf(t, cs); got != before {
		t.Fatalf("term moved from %d to %d after refused messages", before, got)
	}

	// The control: a chunkserver's certificate gets the message to Raft.
	if kept, err := sendRaft(t, s.Addr(), c.Identity(certs.RoleChunkServer), forgedHeartbeat(cs, s.ID(), before)); !kept {
		t.Fatalf("a chunkserver's Raft batch was refused: %v", err)
	}
	soon.Succeeds(t, 5*time.Second, func() error {
		if got := termOf(t, cs); got < before+100 {
			return fmt.Errorf("term %d, want %d", got, before+100)
		}
		return nil
	})
}

// TestRolesAreEnforced: each role reaches what it needs and nothing more.
func TestRolesAreEnforced(t *testing.T) {
	c := startCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	denied := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s: %v, want PermissionDenied", what, err)
		} else if !strings.Contains(err.Error(), "not allowed") {
			t.Errorf("%s: %v does not say why", what, err)
		}
	}

	clientConn := dialMDS(t, c, c.Identity(certs.RoleClient))
	_, err := clientConn.Volumes().DeleteVolume(ctx, &mdspb.DeleteVolumeRequest{Name: "vol"})
	denied("client deletes a volume", err)
	_, err = clientConn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{Name: "p2", PhysicalPool: "pool1", CopysetsPerChunkserver: 1})
	denied("client creates a pool", err)
	_, err = clientConn.Heartbeats().Heartbeat(ctx, &mdspb.HeartbeatRequest{ChunkserverId: c.ChunkServer(0).ID()})
	denied("client sends a chunkserver heartbeat", err)
	if _, err := clientConn.Volumes().ListVolumes(ctx, &mdspb.ListVolumesRequest{}); err != nil {
		t.Errorf("client lists volumes: %v", err)
	}

	csConn := dialMDS(t, c, c.Identity(certs.RoleChunkServer))
	_, err = csConn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "vol", Writable: true, Client: "rogue"})
	denied("chunkserver opens a volume", err)

	// Only the MDS plants replicas on a chunkserver.
	peerCC, err := grpc.NewClient(c.ChunkServer(0).Addr(), certs.DialOption(c.Identity(certs.RoleChunkServer), certs.RoleChunkServer))
	if err != nil {
		t.Fatal(err)
	}
	defer peerCC.Close()
	_, err = copysetpb.NewCopysetServiceClient(peerCC).CreateCopysets(ctx, &copysetpb.CreateCopysetsRequest{
		Copysets: []*copysetpb.CopysetSpec{{Copyset: &commonpb.CopysetRef{LogicalPoolId: 1, CopysetId: 999}}},
	})
	denied("a chunkserver creates a copyset on another", err)

	// On a chunkserver: epochs are the MDS's; chunk IO is a client's.
	cc, err := grpc.NewClient(c.ChunkServer(0).Addr(), certs.DialOption(c.Identity(certs.RoleClient), certs.RoleChunkServer))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	_, err = chunkpb.NewChunkServiceClient(cc).UpdateEpoch(ctx, &chunkpb.UpdateEpochRequest{VolumeId: 1, Epoch: 99})
	denied("client raises a volume epoch", err)
	stream, err := transportpb.NewRaftTransportClient(cc).InstallSnapshot(ctx)
	if err == nil {
		_ = stream.Send(&transportpb.SnapshotChunk{})
		_, err = stream.CloseAndRecv()
	}
	denied("client installs a snapshot", err)
	mdsCC, err := grpc.NewClient(c.ChunkServer(0).Addr(), certs.DialOption(c.Identity(certs.RoleMDS), certs.RoleChunkServer))
	if err != nil {
		t.Fatal(err)
	}
	defer mdsCC.Close()
	_, err = chunkpb.NewChunkServiceClient(mdsCC).WriteChunk(ctx, &chunkpb.WriteChunkRequest{})
	denied("the MDS writes a chunk", err)
	// The same over the wire protocol, the data path.
	wc, err := wire.Dial(ctx, c.ChunkServer(0).Addr(), wire.ClientOptions{Dialer: certs.Dialer(c.Identity(certs.RoleMDS), certs.RoleChunkServer)})
	if err != nil {
		t.Fatal(err)
	}
	defer wc.Close()
	_, err = chunkpb.WireClient{C: wc}.WriteChunk(ctx, &chunkpb.WriteChunkRequest{})
	var re *wire.RemoteError
	if !errors.As(err, &re) || !strings.Contains(re.Msg, "PermissionDenied") {
		t.Errorf("the MDS writes a chunk over the wire protocol: %v, want a refusal", err)
	}

	// And the client's certificate does what a client does.
	v, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "vol", client.Options{TLS: c.Identity(certs.RoleClient), Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	want := make([]byte, 1<<20)
	_, _ = rand.Read(want)
	if _, err := v.WriteAt(ctx, want, 3<<20); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := v.ReadAt(ctx, got, 3<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back over TLS: %v (equal %v)", err, bytes.Equal(got, want))
	}
}

// TestHandshakeFailuresSayWhy: a certificate from another CA and an expired
// one are refused in the handshake, and the caller is told why.
func TestHandshakeFailuresSayWhy(t *testing.T) {
	c := startCluster(t)
	other := cluster.Start(t, cluster.Options{TLS: true, ChunkServers: 1, NoPool: true})
	foreign, err := certs.Load(other.Issue("foreign", certs.Request{Roles: []certs.Role{certs.RoleOperator}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	// A certificate that expires while its process runs: loaded when
	// valid, then the clock passes its end.
	expiring, err := certs.Load(c.Issue("expiring", certs.Request{
		Roles: []certs.Role{certs.RoleOperator}, NotBefore: time.Now().Add(-time.Hour), Valid: time.Hour + 3*time.Second,
	}), nil)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // past the end of expiring
	for _, tc := range []struct {
		name string
		id   *certs.Source
		want string
	}{
		// Our CA does not know the other one's certificates, nor does
		// the other CA's holder trust our MDS's certificate.
		{"foreign CA", foreign, "certificate signed by unknown authority"},
		{"expired", expiring, "expired at"},
		{"plaintext", nil, "requires TLS"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := dialMDS(t, c, tc.id).Volumes().ListVolumes(ctx, &mdspb.ListVolumesRequest{})
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error about %q", tc.name, err, tc.want)
			continue
		}
		t.Logf("%s: %v", tc.name, err)
	}
}

// TestCertificatesRotateUnderIO: while a client writes, every server
// certificate and the client's own are replaced by new ones (new keys)
// from the same CA. No write fails, the last value written to every block
// reads back, and connections made afterwards present the new
// certificates.
func TestCertificatesRotateUnderIO(t *testing.T) {
	c := startCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	clientFiles := c.Issue("rotating-client", certs.Request{Roles: []certs.Role{certs.RoleClient}})
	id, err := certs.Load(clientFiles, testlog.New(t))
	if err != nil {
		t.Fatal(err)
	}
	v, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "vol", client.Options{TLS: id, Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()

	const blocks = 64
	const bs = 64 << 10
	last := make([][]byte, blocks)
	write := func(round int) {
		for b := 0; b < blocks; b++ {
			buf := bytes.Repeat([]byte(fmt.Sprintf("r%05d-b%03d|", round, b)), bs/12+1)[:bs]
			if _, err := v.WriteAt(ctx, buf, int64(b)*bs); err != nil {
				t.Fatalf("round %d block %d: %v", round, b, err)
			}
			last[b] = buf
		}
	}
	write(0)
	// Re-issue every identity the cluster's processes and the client
	// use: same file names, new keys.
	for _, role := range []certs.Role{certs.RoleMDS, certs.RoleChunkServer, certs.RoleOperator} {
		c.Issue(string(role), certs.Request{Roles: []certs.Role{role}})
	}
	c.Issue("rotating-client", certs.Request{Roles: []certs.Role{certs.RoleClient}})
	for round := 1; round <= 6; round++ {
		write(round)
		time.Sleep(300 * time.Millisecond) // past the reload check
	}
	got := make([]byte, bs)
	for b := 0; b < blocks; b++ {
		if _, err := v.ReadAt(ctx, got, int64(b)*bs); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, last[b]) {
			t.Fatalf("block %d reads %q, last written %q", b, got[:12], last[b][:12])
		}
	}
	// A new connection sees the MDS's new certificate, and the MDS takes
	// the client's new one.
	conn, err := tls.Dial("tcp", c.MDS.Addr(), id.ClientConfig())
	if err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	defer conn.Close()
	presented := conn.ConnectionState().PeerCertificates[0]
	pemBytes, err := os.ReadFile(filepath.Join(c.Dir(), "tls", "mds.crt"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || !bytes.Equal(presented.Raw, blk.Bytes) {
		t.Fatal("a new connection to the MDS was not given its new certificate")
	}
}

// TestNonMembersDoNotSpeakRaft: a chunkserver of the cluster, with its own
// valid certificate, sends a copyset it is not a member of a heartbeat, a
// vote request and an append of a higher term, and a snapshot, in its own
// name: the replica refuses them all (by its own configuration and the
// MDS's), its term stays and no chunk is written.
func TestNonMembersDoNotSpeakRaft(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster")
	}
	c := cluster.Start(t, cluster.Options{TLS: true, ChunkServers: 4, Zones: 4, CopysetsPerChunkServer: 3})
	i, cs := follower(t, c)
	s := c.ChunkServer(i)
	st, err := cs.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var outsider uint64
	for _, o := range c.ChunkServers() {
		if !slices.Contains(st.Voters, o.ID()) && !slices.Contains(st.Learners, o.ID()) {
			outsider = o.ID()
		}
	}
	if outsider == 0 {
		t.Fatalf("every chunkserver is a member of %s", cs.ID())
	}
	refused := s.Engine().RefusedMessages()
	b := forgedHeartbeat(cs, s.ID(), st.Term)
	b.From = outsider
	term, last := st.Term+100, st.LastIndex
	for _, typ := range []raftpb.MessageType{raftpb.MsgVote, raftpb.MsgPreVote, raftpb.MsgApp} {
		m := &raftpb.Message{Type: &typ, From: &outsider, To: new(s.ID()), Term: &term, Index: &last, LogTerm: &term}
		if typ == raftpb.MsgApp {
			next := last + 1
			m.Entries = []*raftpb.Entry{{Index: &next, Term: &term, Data: []byte("forged")}}
		}
		b.Messages = append(b.Messages, &transportpb.GroupMessage{Group: uint64(cs.ID()), Message: m})
	}
	deadline := time.Now().Add(2 * time.Second) // past the MDS's answer
	for time.Now().Before(deadline) {
		if _, err := sendRaft(t, s.Addr(), c.Identity(certs.RoleChunkServer), b); err != nil {
			t.Fatal(err)
		}
	}
	if got := termOf(t, cs); got != st.Term {
		t.Fatalf("term moved from %d to %d on a heartbeat from chunkserver %d, not a member", st.Term, got, outsider)
	}
	if s.Engine().RefusedMessages() == refused {
		t.Fatal("no message was counted refused")
	}

	// A snapshot in the outsider's name is refused before any chunk file
	// is written.
	cc, err := grpc.NewClient(s.Addr(), certs.DialOption(c.Identity(certs.RoleChunkServer), certs.RoleChunkServer))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := transportpb.NewRaftTransportClient(cc).InstallSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	snapTyp, idx := raftpb.MsgSnap, st.Applied+1000
	snap, _ := proto.Marshal(&raftpb.Message{Type: &snapTyp, From: &outsider, To: new(s.ID()), Term: &term,
		Snapshot: &raftpb.Snapshot{Metadata: &raftpb.SnapshotMetadata{Index: &idx, Term: &term,
			ConfState: &raftpb.ConfState{Voters: []uint64{outsider, s.ID()}}}}})
	before := cs.Store().List()
	if err := stream.Send(&transportpb.SnapshotChunk{From: outsider, To: s.ID(), Group: uint64(cs.ID()), RaftMessage: snap,
		Files: []*transportpb.SnapshotFile{{ChunkId: 424242, Size: 1 << 20}}}); err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&transportpb.SnapshotChunk{From: outsider, To: s.ID(), ChunkId: 424242, Data: []byte("forged")})
	_ = stream.Send(&transportpb.SnapshotChunk{From: outsider, To: s.ID(), Done: true})
	res, err := stream.CloseAndRecv()
	if err == nil && res.GetAccepted() {
		t.Fatal("a snapshot from a non-member was accepted")
	}
	if got := cs.Store().List(); slices.Contains(got, 424242) || len(got) != len(before) {
		t.Fatalf("chunks %v after a refused snapshot, %v before", got, before)
	}
	if got := termOf(t, cs); got != st.Term {
		t.Fatalf("term moved from %d to %d", st.Term, got)
	}
}
