package mdsclient_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds/mdsclient"
)

// clusterServiceDouble answers GetClusterStatus as a leader, or as a follower
// naming a leader, to exercise the client's redirect handling.
type clusterServiceDouble struct {
	mdspb.UnimplementedClusterServiceServer
	addr   string
	leader atomic.Pointer[string] // "" while no leader is known; nil: this one leads
	calls  atomic.Int32
}

func (d *clusterServiceDouble) GetClusterStatus(ctx context.Context, r *mdspb.GetClusterStatusRequest) (*mdspb.GetClusterStatusResponse, error) {
	d.calls.Add(1)
	if l := d.leader.Load(); l != nil {
		return nil, mdsclient.NotLeaderError(*l)
	}
	return &mdspb.GetClusterStatusResponse{Mds: []*mdspb.MDSInstance{{Address: d.addr, Leader: true}}}, nil
}

func (d *clusterServiceDouble) TransferLeader(ctx context.Context, r *mdspb.TransferLeaderRequest) (*mdspb.TransferLeaderResponse, error) {
	return nil, status.Error(codes.NotFound, "no such copyset")
}

func serve(t *testing.T) *clusterServiceDouble {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	d := &clusterServiceDouble{addr: lis.Addr().String()}
	mdspb.RegisterClusterServiceServer(g, d)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return d
}

func follow(d *clusterServiceDouble, leader string) { d.leader.Store(&leader) }

func TestFollowsNotLeaderToTheLeader(t *testing.T) {
	leader, follower := serve(t), serve(t)
	follow(follower, leader.addr)
	conn, err := mdsclient.Dial([]string{follower.addr}, mdsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp, err := conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Mds[0].Address != leader.addr || conn.Leader() != leader.addr {
		t.Fatalf("answered by %s, following %s; want %s", resp.Mds[0].Address, conn.Leader(), leader.addr)
	}
	if got := conn.Addresses(); len(got) != 2 {
		t.Fatalf("known addresses %v: the redirect target should be learned", got)
	}
	// Errors other than UNAVAILABLE come back as they are, without retry.
	_, err = conn.Cluster().TransferLeader(context.Background(), &mdspb.TransferLeaderRequest{})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("got %v, want NotFound", err)
	}
}

func TestRetriesThroughAnElection(t *testing.T) {
	a, b := serve(t), serve(t)
	follow(a, "") // election in progress: nobody leads
	follow(b, "")
	conn, err := mdsclient.Dial([]string{a.addr, b.addr}, mdsclient.Options{InitialBackoff: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	done := make(chan error, 1)
	go func() {
		_, err := conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{})
		done <- err
	}()
	// Once both were asked at least twice, b wins the election.
	for a.calls.Load() < 2 || b.calls.Load() < 2 {
		time.Sleep(5 * time.Millisecond)
	}
	b.leader.Store(nil)
	follow(a, b.addr)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if conn.Leader() != b.addr {
		t.Fatalf("following %s, want %s", conn.Leader(), b.addr)
	}
}

func TestAllDownNamesEveryAddressTried(t *testing.T) {
	var addrs []string
	for i := 0; i < 2; i++ {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, lis.Addr().String())
		lis.Close() // nothing listens there any more
	}
	conn, err := mdsclient.Dial(addrs, mdsclient.Options{RetryBudget: 500 * time.Millisecond, InitialBackoff: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("got %v, want Unavailable", err)
	}
	for _, a := range addrs {
		if !strings.Contains(err.Error(), a) {
			t.Fatalf("error %q does not name %s", err, a)
		}
	}
}

func TestDialNeedsAnAddress(t *testing.T) {
	if _, err := mdsclient.Dial([]string{" ", ""}, mdsclient.Options{}); !errors.Is(err, mdsclient.ErrNoAddress) {
		t.Fatalf("got %v, want ErrNoAddress", err)
	}
	conn, err := mdsclient.Dial([]string{"127.0.0.1:1,127.0.0.1:2", "127.0.0.1:1"}, mdsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if got := conn.Addresses(); len(got) != 2 {
		t.Fatalf("addresses %v, want the two distinct ones", got)
	}
}

// serveNothing starts a gRPC server without the MDS's services, as a
// chunkserver given by mistake would be.
func serveNothing(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return lis.Addr().String()
}

func TestNotAnMDSFailsAtOnce(t *testing.T) {
	addr := serveNothing(t)
	conn, err := mdsclient.Dial([]string{addr}, mdsclient.Options{RetryBudget: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	_, err = conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), addr+" is not an MDS: unknown service cairn.mds.v1.ClusterService") {
		t.Fatalf("got %v, want Unavailable naming %s as no MDS", err, addr)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("took %s: an address that is no MDS should fail at once, not after the retry budget", took)
	}
}

func TestNotAnMDSIsPassedOver(t *testing.T) {
	other, leader := serveNothing(t), serve(t)
	conn, err := mdsclient.Dial([]string{other, leader.addr}, mdsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{}); err != nil {
		t.Fatal(err)
	}
	if conn.Leader() != leader.addr {
		t.Fatalf("following %s, want %s", conn.Leader(), leader.addr)
	}
}

func TestDeadlineNamesTheAddress(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				_ = c.Close()
			}
		}()
		for {
			c, err := lis.Accept() // accepted, never answered
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	addr := lis.Addr().String()
	conn, err := mdsclient.Dial([]string{addr}, mdsclient.Options{RetryBudget: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = conn.Cluster().GetClusterStatus(context.Background(), &mdspb.GetClusterStatusRequest{})
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "(tried "+addr+"): "+addr+" did not answer in time") {
		t.Fatalf("got %v, want DeadlineExceeded naming %s", err, addr)
	}
}
