package mds_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdstest"
)

func TestWritableOpenBumpsEpochAndFencesEarlierWriters(t *testing.T) {
	c := newCluster(t, 3, 1, nil)
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	c.heartbeatAll() // every double ONLINE: each must acknowledge the push
	vols := c.conn.Volumes()
	first, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Client: "host-a"})
	if err != nil {
		t.Fatal(err)
	}
	if first.Volume.Epoch != 1 || first.Session.Epoch != 1 || first.LeaseSeconds != 30 || first.Constants.ChunkSize != 1<<20 {
		t.Fatalf("first open: %v", first)
	}
	for _, d := range c.css {
		if d.Epoch(v.Id) != 1 {
			t.Fatalf("chunkserver %d holds epoch %d before the open returned, want 1", d.ID(), d.Epoch(v.Id))
		}
	}
	// A read-only open changes no epoch.
	ro, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Client: "reader"})
	if err != nil {
		t.Fatal(err)
	}
	if ro.Volume.Epoch != 1 {
		t.Fatalf("read-only open moved the epoch to %d", ro.Volume.Epoch)
	}
	second, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true, Client: "host-b"})
	if err != nil {
		t.Fatal(err)
	}
	if second.Volume.Epoch != 2 {
		t.Fatalf("second open: epoch %d, want 2", second.Volume.Epoch)
	}
	for _, d := range c.css {
		if d.Epoch(v.Id) != 2 || len(d.EpochCalls()) != 2 {
			t.Fatalf("chunkserver %d: epoch %d after %d pushes, want 2 after 2", d.ID(), d.Epoch(v.Id), len(d.EpochCalls()))
		}
	}
	// The first writer can no longer refresh: it was fenced.
	_, err = vols.RefreshSession(c.ctx, &mdspb.RefreshSessionRequest{Name: "vol0", SessionId: first.Session.SessionId})
	wantCode(t, err, codes.FailedPrecondition)
	ref, err := vols.RefreshSession(c.ctx, &mdspb.RefreshSessionRequest{Name: "vol0", SessionId: second.Session.SessionId})
	if err != nil {
		t.Fatal(err)
	}
	if ref.Session.ExpiresUnix < second.Session.ExpiresUnix {
		t.Fatalf("refresh moved the lease back: %d < %d", ref.Session.ExpiresUnix, second.Session.ExpiresUnix)
	}
	// Who has it open.
	ls, err := vols.ListSessions(c.ctx, &mdspb.ListSessionsRequest{Name: "vol0"})
	if err != nil {
		t.Fatal(err)
	}
	clients := map[string]bool{}
	for _, s := range ls.Sessions {
		clients[s.Client] = true
	}
	if len(ls.Sessions) != 3 || !clients["host-a"] || !clients["host-b"] || !clients["reader"] {
		t.Fatalf("sessions %v", ls.Sessions)
	}
	if _, err := vols.CloseVolume(c.ctx, &mdspb.CloseVolumeRequest{Name: "vol0", SessionId: ro.Session.SessionId}); err != nil {
		t.Fatal(err)
	}
	ls, err = vols.ListSessions(c.ctx, &mdspb.ListSessionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ls.Sessions) != 2 {
		t.Fatalf("%d sessions after close, want 2", len(ls.Sessions))
	}
}

func TestHeartbeatCarriesEpochTableWhenBehind(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.UnstableTimeout = 300 * time.Millisecond })
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	late := c.css[2]
	// Unreachable at open time and missing heartbeats (UNSTABLE): the open
	// goes on without it once its epoch lease has run out.
	late.SetFailing(true)
	c.heartbeatLoop(func(d *mdstest.ChunkServerDouble) bool { return d == late })
	soon.Succeeds(t, 10*time.Second, func() error {
		got, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: late.ID()})
		if err != nil {
			return err
		}
		if s := got.Chunkserver.OnlineState; s != mdspb.OnlineState_ONLINE_STATE_UNSTABLE {
			return fmt.Errorf("chunkserver is %s", s)
		}
		return nil
	})
	if _, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true}); err != nil {
		t.Fatal(err)
	}
	if late.Epoch(v.Id) != 0 {
		t.Fatal("failing double took the push")
	}
	late.SetFailing(false)
	resp, err := late.Heartbeat(c.ctx, c.conn.Heartbeats())
	if err != nil {
		t.Fatal(err)
	}
	if resp.EpochLeaseMs != 500 {
		t.Fatalf("heartbeat answer grants an epoch lease of %dms, want 500 (5 heartbeat intervals)", resp.EpochLeaseMs)
	}
	if resp.EpochTableVersion == 0 || len(resp.Epochs) != 1 || resp.Epochs[0].VolumeId != v.Id || resp.Epochs[0].Epoch != 1 {
		t.Fatalf("heartbeat response %v, want the epoch table with volume %d at epoch 1", resp, v.Id)
	}
	if late.Epoch(v.Id) != 1 {
		t.Fatalf("double holds epoch %d after the heartbeat", late.Epoch(v.Id))
	}
	resp, err = late.Heartbeat(c.ctx, c.conn.Heartbeats())
	if err != nil {
		t.Fatal(err)
	}
	if resp.EpochTableVersion != 0 || len(resp.Epochs) != 0 {
		t.Fatalf("an up-to-date chunkserver got the table again: %v", resp)
	}
}

func TestEpochPushReachesOfflineChunkServers(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) {
		cfg.UnstableTimeout, cfg.OfflineTimeout = 200*time.Millisecond, 400*time.Millisecond
	})
	quiet := c.css[2]
	// Every chunkserver heartbeats while the pool and the volume are made
	// (the offline timeout is short); then one stops (as when cut off from
	// the MDS) but still serves: the MDS must not skip it because it looks
	// OFFLINE.
	var silent atomic.Bool
	c.heartbeatLoop(func(d *mdstest.ChunkServerDouble) bool { return silent.Load() && d == quiet })
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	silent.Store(true)
	soon.Succeeds(t, 10*time.Second, func() error {
		got, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: quiet.ID()})
		if err != nil {
			return err
		}
		if s := got.Chunkserver.OnlineState; s != mdspb.OnlineState_ONLINE_STATE_OFFLINE {
			return fmt.Errorf("chunkserver is %s", s)
		}
		return nil
	})
	if _, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true}); err != nil {
		t.Fatal(err)
	}
	if quiet.Epoch(v.Id) != 1 || len(quiet.EpochCalls()) != 1 {
		t.Fatalf("OFFLINE chunkserver holds epoch %d after %d pushes; want epoch 1 from the open's push", quiet.Epoch(v.Id), len(quiet.EpochCalls()))
	}
}

func TestOpenWaitsOutTheEpochLeaseOfAnUnreachableChunkServer(t *testing.T) {
	const lease = 2 * time.Second
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.EpochLease = lease })
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	c.heartbeatAll()
	gone := c.css[1]
	gone.SetFailing(true)
	start := time.Now()
	resp, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true})
	if err != nil {
		t.Fatalf("open with one chunkserver unreachable: %v, want success after the lease", err)
	}
	// The guarantee: the open did not return before a chunkserver that
	// missed the push, holding a lease from before the bump, lost it.
	if waited := time.Since(start); waited < lease {
		t.Fatalf("open returned after %s, before the %s epoch lease of the unreachable chunkserver ran out", waited, lease)
	}
	if resp.Volume.Epoch != 1 || gone.Epoch(v.Id) != 0 {
		t.Fatalf("epoch %d, unreachable double holds %d; want 1 and 0", resp.Volume.Epoch, gone.Epoch(v.Id))
	}
	for _, d := range c.css {
		if d != gone && d.Epoch(v.Id) != 1 {
			t.Fatalf("chunkserver %d holds epoch %d, want 1", d.ID(), d.Epoch(v.Id))
		}
	}
}

func TestOpenEndsItsWaitOnceTheChunkServerReportsTheNewTable(t *testing.T) {
	// A long lease: the open can only return within its deadline by seeing
	// the chunkserver that refused the push report the new table.
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.EpochLease = 5 * time.Minute })
	c.createPool(3)
	v := c.createVolume("vol0", seg)
	c.heartbeatAll()
	late := c.css[0]
	late.SetFailing(true) // refuses UpdateEpoch, still heartbeats
	c.heartbeatLoop(nil)
	ctx, cancel := context.WithTimeout(c.ctx, 30*time.Second)
	defer cancel()
	resp, err := c.conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	if late.Epoch(v.Id) != resp.Volume.Epoch || len(late.EpochCalls()) != 0 {
		t.Fatalf("double holds epoch %d after %d pushes, want %d from its heartbeat", late.Epoch(v.Id), len(late.EpochCalls()), resp.Volume.Epoch)
	}
}

func TestAbandonedOpenStillFences(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.EpochLease = 5 * time.Minute })
	c.createPool(3)
	c.createVolume("vol0", seg)
	c.heartbeatAll()
	c.css[1].SetFailing(true)
	ctx, cancel := context.WithTimeout(c.ctx, time.Second)
	defer cancel()
	_, err := c.conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true})
	wantCode(t, err, codes.DeadlineExceeded)
	c.css[1].SetFailing(false)
	resp, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	// The abandoned open still fenced: epochs only grow.
	if resp.Volume.Epoch != 2 || c.css[1].Epoch(resp.Volume.Id) != 2 {
		t.Fatalf("epoch %d, double holds %d; want 2", resp.Volume.Epoch, c.css[1].Epoch(resp.Volume.Id))
	}
}

func TestShortenedEpochLeaseWaitsOutTheEarlierLeadersLease(t *testing.T) {
	const long = 4 * time.Second
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.EpochLease = long })
	c.createPool(3)
	c.createVolume("vol0", seg)
	c.heartbeatAll() // the doubles hold leases of 4s
	c.mds.Stop()
	short := c.cfg
	short.EpochLease = 500 * time.Millisecond
	start := time.Now()
	restarted := startMDS(t, short, true)
	conn := dial(t, restarted.Addr())
	c.css[2].SetFailing(true)
	if _, err := conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true}); err != nil {
		t.Fatal(err)
	}
	// A lease the first MDS granted may run until 4s after its last answer,
	// which came before the new leader took over.
	if waited := time.Since(start); waited < long {
		t.Fatalf("open returned %s after the restart, before the earlier %s lease could have run out", waited, long)
	}
}

func TestSessionsExpireWithoutRefresh(t *testing.T) {
	c := newCluster(t, 3, 1, func(cfg *mds.Config) { cfg.SessionLease = 3 * time.Second })
	c.createPool(3)
	c.createVolume("vol0", seg)
	open, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.conn.Volumes().DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "vol0"})
	wantCode(t, err, codes.FailedPrecondition)
	soon.Succeeds(t, 10*time.Second, func() error {
		ls, err := c.conn.Volumes().ListSessions(c.ctx, &mdspb.ListSessionsRequest{})
		if err != nil {
			return err
		}
		if len(ls.Sessions) != 0 {
			return fmt.Errorf("%d sessions", len(ls.Sessions))
		}
		return nil
	})
	_, err = c.conn.Volumes().RefreshSession(c.ctx, &mdspb.RefreshSessionRequest{Name: "vol0", SessionId: open.Session.SessionId})
	wantCode(t, err, codes.NotFound)
	if _, err := c.conn.Volumes().DeleteVolume(c.ctx, &mdspb.DeleteVolumeRequest{Name: "vol0"}); err != nil {
		t.Fatalf("delete after the writer's lease expired: %v", err)
	}
}

func TestEpochLeaseOutsideItsBoundsIsRefused(t *testing.T) {
	for _, lease := range []time.Duration{150 * time.Millisecond, 11 * time.Minute} {
		cfg := testConfig(t, t.TempDir()) // heartbeats every 100ms
		cfg.EpochLease = lease
		_, err := mds.New(cfg)
		if !errors.Is(err, mds.ErrInvalidConfig) || !strings.Contains(err.Error(), "epoch lease "+lease.String()) {
			t.Fatalf("epoch lease %s: %v, want ErrInvalidConfig naming it", lease, err)
		}
	}
}
