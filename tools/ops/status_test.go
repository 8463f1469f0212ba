package ops

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
)

func TestStatusHealthy(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(4)
	c.mustRun("create", "volume", "vol-a", "--size", "20MiB")

	m := c.jsonRun(ExitOK, "status")
	if !jbool(t, m, "healthy") {
		t.Fatalf("cluster not healthy: %v", jget(t, m, "problems"))
	}
	if n := jlen(t, m, "problems"); n != 0 {
		t.Errorf("%d problems listed for a healthy cluster", n)
	}
	if got := jstr(t, m, "mds.0.role"); got != "leader" {
		t.Errorf("mds.0.role = %q, want leader", got)
	}
	if got := jstr(t, m, "mds.0.address"); got != c.mds.Addr() {
		t.Errorf("mds.0.address = %q, want %q", got, c.mds.Addr())
	}
	if !jbool(t, m, "etcd.0.leader") {
		t.Error("the embedded etcd member is not reported as leader")
	}
	for path, want := range map[string]uint64{
		"chunkservers.total": 3, "chunkservers.online": 3, "chunkservers.offline": 0,
		"copysets.total": 4, "copysets.healthy": 4, "copysets.unhealthy": 0,
		"space.disk_total_bytes": 300 << 30, "space.disk_free_bytes": 180 << 30, "space.disk_used_bytes": 120 << 30,
		"space.pool_total_bytes": 3000 << 20, "space.pool_used_bytes": 300 << 20, "space.pool_free_bytes": 2700 << 20,
		"space.provisioned_bytes": 24 << 20, "space.allocated_bytes": 0,
		"formatting.percent": 100, "formatting.formatted_chunks": 3000, "formatting.target_chunks": 3000,
		"volumes.total": 1, "pending_operators": 0,
	} {
		if got := jnum(t, m, path); got != want {
			t.Errorf("%s = %d, want %d", path, got, want)
		}
	}
	if got := jstr(t, m, "logical_pools.0.status"); got != "ready" {
		t.Errorf("logical_pools.0.status = %q, want ready", got)
	}

	r := c.mustRun("status")
	golden(t, "status_healthy", c.normalize(r.stdout, nil))
}

// statusReporter sends the heartbeats of one double by hand, with copyset
// reports the test writes (progress, roles) that the double cannot send.
type statusReporter struct {
	c      *doubleCluster
	i      int
	report func(spec *copysetpb.CopysetSpec) *copysetpb.CopysetStatus
}

func (r *statusReporter) send(ctx context.Context) error {
	d := r.c.css[r.i]
	req := &mdspb.HeartbeatRequest{ChunkserverId: d.ID(), Token: d.Token(), Address: d.Addr,
		Capacity: &mdspb.Capacity{DiskTotalBytes: 100 << 30, DiskFreeBytes: 60 << 30, PoolFreeChunks: 900, PoolUsedChunks: 100, PoolTargetChunks: 1000, FormatPercent: 100, PoolGrowableChunks: 2000}}
	for _, spec := range d.Copysets() {
		if st := r.report(spec); st != nil {
			req.Copysets = append(req.Copysets, &mdspb.CopysetReport{Status: st})
		}
	}
	_, err := r.c.conn.Heartbeats().Heartbeat(ctx, req)
	return err
}

func (r *statusReporter) loop(t *testing.T) {
	r.c.setSilent(r.i, true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			_ = r.send(ctx)
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
}

// TestStatusNamesEachCopysetProblem makes the leader of four copysets report
// each kind of trouble a leader can see and expects status to name it.
func TestStatusNamesEachCopysetProblem(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.mustRun("create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", "5")
	leader := c.css[0]
	ids := []uint64{c.css[0].ID(), c.css[1].ID(), c.css[2].ID()}
	const applied = 5000
	rep := &statusReporter{c: c, i: 0, report: func(spec *copysetpb.CopysetSpec) *copysetpb.CopysetStatus {
		st := &copysetpb.CopysetStatus{
			Copyset: spec.Copyset, ChunkserverId: leader.ID(), Role: copysetpb.Role_ROLE_LEADER, LeaderId: leader.ID(),
			Peers: spec.Peers, Term: 2, CommitIndex: applied, AppliedIndex: applied, LastLogIndex: applied,
		}
		for _, id := range ids {
			st.Progress = append(st.Progress, &copysetpb.PeerProgress{ChunkserverId: id, MatchIndex: applied, State: "replicate", RecentActive: true, HeardMsAgo: 80})
		}
		switch spec.Copyset.CopysetId {
		case 1: // healthy
		case 2:
			st.Progress[1].RecentActive = false
			st.Progress[1].HeardMsAgo = 12_400
			st.Progress[1].State = "probe"
		case 3:
			st.Progress[2].State = "snapshot"
			st.Progress[2].MatchIndex = 10
		case 4:
			st.Progress[1].MatchIndex = applied - 1500
		case 5:
			// Never reports leadership: no leader is ever recorded.
			st.Role, st.LeaderId, st.Progress = copysetpb.Role_ROLE_FOLLOWER, 0, nil
		}
		return st
	}}
	rep.loop(t)
	soon.Succeeds(t, 10*time.Second, func() error {
		for _, cs := range c.copysets() {
			if cs.Id.CopysetId != 5 && cs.LeaderId != leader.ID() {
				return fmt.Errorf("copyset %s has no leader recorded yet", cs.Id.Name())
			}
		}
		return nil
	})

	m := c.jsonRun(ExitUnhealthy, "status")
	if jbool(t, m, "healthy") {
		t.Fatal("status says healthy")
	}
	want := map[string][]string{
		"1:2": {reasonUnderReplicated},
		"1:3": {reasonInstallingSnapshot},
		"1:4": {reasonLogGap},
		"1:5": {reasonNoLeader},
	}
	got := map[string][]string{}
	for i := range jlen(t, m, "copysets.unhealthy_copysets") {
		p := fmt.Sprintf("copysets.unhealthy_copysets.%d", i)
		got[jstr(t, m, p+".copyset")] = jstrings(t, m, p+".reasons")
	}
	for cs, reasons := range want {
		if !slices.Equal(got[cs], reasons) {
			t.Errorf("copyset %s: reasons %v, want %v", cs, got[cs], reasons)
		}
	}
	if len(got) != len(want) {
		t.Errorf("unhealthy copysets %v, want exactly %v", got, want)
	}
	for path, want := range map[string]uint64{
		"copysets.total": 5, "copysets.healthy": 1, "copysets.unhealthy": 4,
		"copysets.by_reason.no_leader": 1, "copysets.by_reason.log_gap": 1,
	} {
		if got := jnum(t, m, path); got != want {
			t.Errorf("%s = %d, want %d", path, got, want)
		}
	}
	// One line per cause: chunkserver 2 troubles two copysets, in two
	// ways; the other causes touch one copyset each and read as its
	// problem.
	problems := jstrings(t, m, "problems")
	wantProblems := []string{
		fmt.Sprintf("chunkserver %d (host-1, %s, zone zone-1) silent for 12s: 2 copysets unhealthy: 1 under-replicated, 1 lagging (up to 1500 entries behind) (1:2, 1:4)",
			ids[1], c.css[1].Addr),
		fmt.Sprintf("copyset 1:3: chunkserver %d (%s) is receiving a snapshot", ids[2], c.css[2].Addr),
		"copyset 1:5: no leader has reported",
	}
	if !slices.Equal(problems, wantProblems) {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(problems, "\n"), strings.Join(wantProblems, "\n"))
	}
	// --details names each copyset's own problem under its cause.
	details := c.run("status", "--details").stdout
	for _, frag := range []string{
		fmt.Sprintf("      1:2: leader has not heard from chunkserver %d (%s) for 12s\n", ids[1], c.css[1].Addr),
		fmt.Sprintf("      1:4: chunkserver %d (%s) is 1500 entries behind the leader (allowed 1000)\n", ids[1], c.css[1].Addr),
	} {
		if !strings.Contains(details, frag) {
			t.Errorf("status --details does not say %q:\n%s", frag, details)
		}
	}
	// A wider allowed gap clears the lagging copyset.
	m = c.jsonRun(ExitUnhealthy, "status", "--max-log-gap", "2000")
	if got := jnum(t, m, "copysets.unhealthy"); got != 3 {
		t.Errorf("with --max-log-gap 2000: %d unhealthy copysets, want 3", got)
	}

	r := c.run("status")
	if r.code != ExitUnhealthy {
		t.Fatalf("status exit %d, want %d", r.code, ExitUnhealthy)
	}
	golden(t, "status_copyset_problems", c.normalize(r.stdout, nil))
}

// TestStatusOfflineChunkserver stops one chunkserver's heartbeats and expects
// status to name it, and the copysets it is a member of and the volumes
// with data in them in one line for the one cause.
func TestStatusOfflineChunkserver(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	c.mustRun("create", "volume", "v", "--size", "8MiB")
	if _, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "v", Offset: 0, Allocate: true}); err != nil {
		t.Fatal(err)
	}
	c.setSilent(2, true)
	dead := c.css[2]
	var m map[string]any
	soon.Succeeds(t, 15*time.Second, func() error {
		r := c.run("-o", "json", "status")
		m = decodeJSON(t, r.stdout)
		if n := jnum(t, m, "chunkservers.offline"); n != 1 {
			return fmt.Errorf("%d offline chunkservers", n)
		}
		if r.code != ExitUnhealthy {
			return fmt.Errorf("exit %d", r.code)
		}
		return nil
	})
	if jnum(t, m, "chunkservers.online") != 2 {
		t.Errorf("chunkservers: %v", jget(t, m, "chunkservers"))
	}
	if got := jnum(t, m, "copysets.by_reason.peers_offline"); got != 3 {
		t.Errorf("copysets with peers offline = %d, want 3", got)
	}
	// The chunkserver's state and what it does to its copysets are one
	// cause, one line.
	problems := jstrings(t, m, "problems")
	want := fmt.Sprintf("chunkserver %d (host-2, %s, zone zone-2) is offline: 3 copysets without this replica (1:1, 1:2, 1:3); volumes: v", dead.ID(), dead.Addr)
	if len(problems) != 1 || problems[0] != want {
		t.Errorf("problems:\n%s\nwant the one line\n%s", strings.Join(problems, "\n"), want)
	}
	// Offline chunkservers' space is not counted.
	if got := jnum(t, m, "space.disk_total_bytes"); got != 200<<30 {
		t.Errorf("disk total %d, want %d", got, uint64(200<<30))
	}

	// It comes back: healthy again.
	c.setSilent(2, false)
	soon.Succeeds(t, 15*time.Second, func() error {
		if r := c.run("status"); r.code != ExitOK {
			return fmt.Errorf("status exit %d:\n%s", r.code, r.stdout)
		}
		return nil
	})
}

// TestStatusPoolBeingCreated: a chunkserver that fails to create its
// copysets leaves the pool CREATING, which status reports, and create pool
// --wait waits until the MDS's retries succeed.
func TestStatusPoolBeingCreated(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.css[1].SetFailing(true)
	r := c.run("create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", "2")
	if r.code != ExitError || !strings.Contains(r.stderr, `logical pool "lp0" is recorded but 1 of 3 chunkservers did not create their copysets`) {
		t.Fatalf("create pool with a failing chunkserver: exit %d, stderr %q", r.code, r.stderr)
	}
	m := c.jsonRun(ExitUnhealthy, "status")
	if !slices.Contains(jstrings(t, m, "problems"), `logical pool "lp0" is still being created: not every chunkserver has created its copysets`) {
		t.Errorf("problems: %v", jstrings(t, m, "problems"))
	}
	if got := jstr(t, m, "logical_pools.0.status"); got != "creating" {
		t.Errorf("pool status %q, want creating", got)
	}
	// A volume cannot be created in it yet.
	if r := c.run("create", "volume", "v", "--size", "8MiB"); r.code != ExitError {
		t.Errorf("create volume in a creating pool: exit %d, want %d (%s)", r.code, ExitError, r.stderr)
	}
	c.css[1].SetFailing(false)
	m = c.jsonRun(ExitOK, "create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", "2", "--wait", "20s")
	if got := jstr(t, m, "status"); got != "ready" {
		t.Errorf("create pool --wait: status %q, want ready", got)
	}
	if got := jnum(t, m, "copysets"); got != 2 {
		t.Errorf("create pool --wait: %d copysets, want 2", got)
	}
}

func TestStatusEmptyCluster(t *testing.T) {
	c := newDoubleCluster(t, 0)
	m := c.jsonRun(ExitUnhealthy, "status")
	problems := jstrings(t, m, "problems")
	for _, want := range []string{"no chunkserver is registered", "no logical pool exists (create one with: cairn-ops create pool)"} {
		if !slices.Contains(problems, want) {
			t.Errorf("problems %v lack %q", problems, want)
		}
	}
}

// TestStatusNamesUnreachableMDS lists a dead MDS address next to the live
// one: status still answers, and names the dead one as a problem.
func TestStatusNamesUnreachableMDS(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(2)
	dead := "127.0.0.1:1"
	r := runOps(t, "", "-o", "json", "--mds", dead+","+c.mds.Addr(), "--timeout", "5s", "status")
	if r.code != ExitUnhealthy {
		t.Fatalf("exit %d, want %d\n%s%s", r.code, ExitUnhealthy, r.stdout, r.stderr)
	}
	m := decodeJSON(t, r.stdout)
	roles := map[string]string{}
	for i := range jlen(t, m, "mds") {
		roles[jstr(t, m, fmt.Sprintf("mds.%d.address", i))] = jstr(t, m, fmt.Sprintf("mds.%d.role", i))
	}
	if roles[c.mds.Addr()] != "leader" || roles[dead] != "unreachable" {
		t.Errorf("mds roles %v", roles)
	}
	if p := jstrings(t, m, "problems"); len(p) != 1 || !strings.HasPrefix(p[0], "MDS 127.0.0.1:1 does not answer") {
		t.Errorf("problems %v", p)
	}
}

func TestMDSCopysetHealthUnit(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	byID := map[uint64]*mdspb.ChunkServer{
		1: {Id: 1, Address: "a:1", OnlineState: mdspb.OnlineState_ONLINE_STATE_ONLINE},
		2: {Id: 2, Address: "a:2", OnlineState: mdspb.OnlineState_ONLINE_STATE_ONLINE},
		3: {Id: 3, Address: "a:3", OnlineState: mdspb.OnlineState_ONLINE_STATE_OFFLINE},
		4: {Id: 4, Address: "a:4", OnlineState: mdspb.OnlineState_ONLINE_STATE_UNSTABLE},
		7: {Id: 7, Address: "a:7", OnlineState: mdspb.OnlineState_ONLINE_STATE_ONLINE},
	}
	peers := func(ids ...uint64) []*commonpb.Peer {
		var out []*commonpb.Peer
		for _, id := range ids {
			out = append(out, &commonpb.Peer{ChunkserverId: id})
		}
		return out
	}
	progress := func(id, match uint64, state string, active bool) *copysetpb.PeerProgress {
		pr := &copysetpb.PeerProgress{ChunkserverId: id, MatchIndex: match, State: state, RecentActive: active}
		if !active {
			pr.HeardMsAgo = 5000
		}
		return pr
	}
	p := healthParams{maxLogGap: 100, staleAfter: 30 * time.Second, now: now}
	fresh := now.Unix()
	for _, tc := range []struct {
		name string
		cs   *mdspb.Copyset
		want []string
	}{
		{"healthy", &mdspb.Copyset{Peers: peers(1, 2, 4), LeaderId: 1, ReportedUnix: fresh}, nil},
		{"unregistered member", &mdspb.Copyset{Peers: peers(1, 2, 5), LeaderId: 1, ReportedUnix: fresh}, []string{reasonPeersOffline}},
		{"leader offline", &mdspb.Copyset{Peers: peers(1, 2, 3), LeaderId: 3, ReportedUnix: fresh}, []string{reasonPeersOffline, reasonNoLeader}},
		{"never led", &mdspb.Copyset{Peers: peers(1, 2, 4)}, []string{reasonNoLeader}},
		{"two replicas", &mdspb.Copyset{Peers: peers(1, 2), LeaderId: 1, ReportedUnix: fresh}, []string{reasonUnderReplicated}},
		{"stale report", &mdspb.Copyset{Peers: peers(1, 2, 4), LeaderId: 1, ReportedUnix: fresh - 31}, []string{reasonNoLeader}},
		{"leader not a member", &mdspb.Copyset{Peers: peers(1, 2, 4), LeaderId: 7, ReportedUnix: fresh}, []string{reasonNoLeader}},
		{"gap within bound", &mdspb.Copyset{Peers: peers(1, 2, 4), LeaderId: 1, ReportedUnix: fresh, AppliedIndex: 200,
			Progress: []*copysetpb.PeerProgress{progress(1, 200, "replicate", true), progress(2, 100, "replicate", true), progress(4, 250, "replicate", true)}}, nil},
		{"gap too large", &mdspb.Copyset{Peers: peers(1, 2, 4), LeaderId: 1, ReportedUnix: fresh, AppliedIndex: 200,
			Progress: []*copysetpb.PeerProgress{progress(1, 200, "replicate", true), progress(2, 99, "replicate", true), progress(4, 200, "replicate", true)}}, []string{reasonLogGap}},
		{"snapshot and silent", &mdspb.Copyset{Peers: peers(1, 2, 4), LeaderId: 1, ReportedUnix: fresh, AppliedIndex: 200,
			Progress: []*copysetpb.PeerProgress{progress(1, 200, "replicate", true), progress(2, 0, "snapshot", true), progress(4, 0, "probe", false)}},
			[]string{reasonInstallingSnapshot, reasonUnderReplicated, reasonLogGap}},
		{"offline member's progress is not counted twice", &mdspb.Copyset{Peers: peers(1, 2, 3), LeaderId: 1, ReportedUnix: fresh, AppliedIndex: 5000,
			Progress: []*copysetpb.PeerProgress{progress(1, 5000, "replicate", true), progress(2, 5000, "replicate", true), progress(3, 0, "probe", false)}},
			[]string{reasonPeersOffline}},
	} {
		h := mdsCopysetHealth(tc.cs, 3, byID, p)
		if !slices.Equal(h.reasons, tc.want) {
			t.Errorf("%s: reasons %v (%v), want %v", tc.name, h.reasons, h.problems, tc.want)
		}
	}
}

// TestStatusShowsFollowers runs a second MDS over the first one's etcd: it
// follows, status names both, and a CLI given only the follower's address
// is redirected to the leader.
func TestStatusShowsFollowers(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(1)
	cfg := testMDSConfig(t, t.TempDir())
	cfg.EtcdEndpoints = c.mds.EtcdEndpoints()
	follower, err := mds.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := follower.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(follower.Stop)

	var m map[string]any
	soon.Succeeds(t, 20*time.Second, func() error {
		r := runOps(t, "", "-o", "json", "--mds", follower.Addr(), "--timeout", "5s", "status")
		if r.code != ExitOK {
			return fmt.Errorf("exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
		m = decodeJSON(t, r.stdout)
		if n := jlen(t, m, "mds"); n != 2 {
			return fmt.Errorf("%d MDS listed", n)
		}
		return nil
	})
	if jstr(t, m, "mds.0.address") != c.mds.Addr() || jstr(t, m, "mds.0.role") != "leader" ||
		jstr(t, m, "mds.1.address") != follower.Addr() || jstr(t, m, "mds.1.role") != "follower" {
		t.Errorf("mds %v", jget(t, m, "mds"))
	}
}
