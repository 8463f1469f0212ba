package ops

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
)

// poolWithVolume makes a 100-copyset pool led by the first double, and a
// volume vol0 with one segment allocated.
func poolWithVolume(t *testing.T, c *doubleCluster) {
	t.Helper()
	c.createPool(100)
	if n := len(c.copysets()); n != 100 {
		t.Fatalf("%d copysets, want 100", n)
	}
	c.mustRun("create", "volume", "vol0", "--size", "64MiB")
	if _, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol0", Offset: 0, Allocate: true}); err != nil {
		t.Fatal(err)
	}
}

// TestStatusGroupsSilentChunkserver: the leader of 100 copysets has not
// heard from one chunkserver for 5 to 9 s, a different time in each (a
// paused process, not yet unstable at the MDS): status says so in one line
// with the longest silence, the copysets counted and the volume named, and
// --details lists the 100 copysets.
func TestStatusGroupsSilentChunkserver(t *testing.T) {
	c := newDoubleCluster(t, 3)
	poolWithVolume(t, c)
	leader, paused := c.css[0], c.css[2]
	ids := []uint64{c.css[0].ID(), c.css[1].ID(), c.css[2].ID()}
	const applied = 100
	rep := &statusReporter{c: c, i: 0, report: func(spec *copysetpb.CopysetSpec) *copysetpb.CopysetStatus {
		st := &copysetpb.CopysetStatus{
			Copyset: spec.Copyset, ChunkserverId: leader.ID(), Role: copysetpb.Role_ROLE_LEADER, LeaderId: leader.ID(),
			Peers: spec.Peers, Term: 2, CommitIndex: applied, AppliedIndex: applied, LastLogIndex: applied,
		}
		for _, id := range ids {
			pr := &copysetpb.PeerProgress{ChunkserverId: id, MatchIndex: applied, State: "replicate", RecentActive: true, HeardMsAgo: 80}
			if id == paused.ID() {
				pr.HeardMsAgo = 5000 + uint64(spec.Copyset.CopysetId*61%4000)
				pr.State, pr.RecentActive = "probe", false
			}
			st.Progress = append(st.Progress, pr)
		}
		return st
	}}
	rep.loop(t)
	var m map[string]any
	soon.Succeeds(t, 10*time.Second, func() error {
		r := c.run("-o", "json", "status")
		if r.code != ExitUnhealthy {
			return fmt.Errorf("status: exit %d", r.code)
		}
		m = decodeJSON(t, r.stdout)
		if n := jnum(t, m, "copysets.unhealthy"); n != 100 {
			return fmt.Errorf("%d copysets unhealthy", n)
		}
		return nil
	})
	want := fmt.Sprintf("chunkserver %d (host-2, %s, zone zone-2) silent for 8s: 100 copysets under-replicated (1:1, 1:2, 1:3, 1:4 and 96 more); volumes: vol0",
		paused.ID(), paused.Addr)
	if p := jstrings(t, m, "problems"); len(p) != 1 || p[0] != want {
		t.Errorf("problems:\n%s\nwant the one line\n%s", strings.Join(p, "\n"), want)
	}

	r := c.run("status")
	if r.code != ExitUnhealthy {
		t.Fatalf("status: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	golden(t, "status_chunkserver_silent", c.normalize(r.stdout, nil))

	r = c.run("status", "--details")
	lines := strings.Split(r.stdout, "\n")
	var details []string
	for _, l := range lines {
		if strings.HasPrefix(l, "      1:") {
			details = append(details, strings.TrimSpace(l))
		}
	}
	if len(details) != 100 {
		t.Fatalf("status --details: %d per-copyset lines, want 100:\n%s", len(details), r.stdout)
	}
	if want := fmt.Sprintf("1:65: leader has not heard from chunkserver %d (%s) for 8s", paused.ID(), paused.Addr); !strings.Contains(r.stdout, want) {
		t.Errorf("status --details does not say %q:\n%s", want, r.stdout)
	}
	if want := fmt.Sprintf("1:1: leader has not heard from chunkserver %d (%s) for 5s", paused.ID(), paused.Addr); details[0] != want {
		t.Errorf("first detail %q, want %q", details[0], want)
	}
}

// TestStatusGroupsOfflineChunkserver: one of three chunkservers in three
// zones goes offline under a 100-copyset pool and stays down past
// recover-after; no chunkserver can take its replicas. status reads as one
// cause: the chunkserver offline, the copysets without its replica, that
// none can be repaired now and why, and the volume.
func TestStatusGroupsOfflineChunkserver(t *testing.T) {
	c := newDoubleClusterWith(t, 3, func(cfg *mds.Config) {
		cfg.Schedule.RecoverAfter = cfg.OfflineTimeout
		cfg.Schedule.Interval = 200 * time.Millisecond
	})
	poolWithVolume(t, c)
	dead := c.css[2]
	c.setSilent(2, true)
	var m map[string]any
	soon.Succeeds(t, 30*time.Second, func() error {
		r := c.run("-o", "json", "status")
		if r.code != ExitUnhealthy {
			return fmt.Errorf("status: exit %d", r.code)
		}
		m = decodeJSON(t, r.stdout)
		if n := jnum(t, m, "chunkservers.offline"); n != 1 {
			return fmt.Errorf("%d chunkservers offline", n)
		}
		if n := jnum(t, m, "recovery.copysets_blocked"); n != 100 {
			return fmt.Errorf("%d copysets blocked", n)
		}
		return nil
	})
	p := jstrings(t, m, "problems")
	want := fmt.Sprintf("chunkserver %d (host-2, %s, zone zone-2) is offline: 100 copysets without this replica (1:1, 1:2, 1:3, 1:4 and 96 more), "+
		"100 of them cannot be repaired now: no online chunkserver with space outside zones ", dead.ID(), dead.Addr)
	if len(p) != 1 || !strings.HasPrefix(p[0], want) || !strings.HasSuffix(p[0], " of its other replicas; volumes: vol0") {
		t.Errorf("problems:\n%s\nwant one line starting\n%s", strings.Join(p, "\n"), want)
	}
	if n := jlen(t, m, "recovery.blocked"); n != 100 || !strings.HasPrefix(jstr(t, m, "recovery.blocked.0.reason"), "no online chunkserver") {
		t.Errorf("recovery.blocked: %d, first %v", n, jget(t, m, "recovery.blocked.0"))
	}

	r := c.run("status")
	if r.code != ExitUnhealthy {
		t.Fatalf("status: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	golden(t, "status_chunkserver_offline", c.normalize(r.stdout, nil))

	r = c.run("status", "--details")
	if n := strings.Count(r.stdout, ": cannot be repaired now: "); n != 100 {
		t.Errorf("status --details: %d copysets named as not repairable, want 100:\n%s", n, r.stdout)
	}
	if want := fmt.Sprintf("      1:7: member chunkserver %d (%s) is offline\n", dead.ID(), dead.Addr); !strings.Contains(r.stdout, want) {
		t.Errorf("status --details does not say %q:\n%s", want, r.stdout)
	}
}

// TestCausesUnit groups crafted findings: two chunkservers offline under
// one copyset make two causes that both count it, an unstable chunkserver
// with no copyset is a cause alone, a sentence about copysets themselves
// groups by sentence, and copysets that cannot be repaired for no
// chunkserver's sake group by reason.
func TestCausesUnit(t *testing.T) {
	topo := &topology{csByID: map[uint64]*mdspb.ChunkServer{
		1: {Id: 1, Hostname: "h1", Address: "a:1", Zone: "z1"},
		2: {Id: 2, Hostname: "h2", Address: "a:2", Zone: "z2"},
		4: {Id: 4, Hostname: "h4", Address: "a:4", Zone: "z4"},
	}}
	var c causes
	c.chunkserver(1, "offline")
	c.chunkserver(2, "offline")
	c.chunkserver(4, "unstable")
	down := func(cs uint64) finding {
		return finding{reason: reasonPeersOffline, cs: cs, text: fmt.Sprintf("member chunkserver %d (a:%d) is offline", cs, cs)}
	}
	c.add(ref(1, 1), []finding{down(1), down(2)})
	c.add(ref(1, 2), []finding{down(1), {reason: reasonNoLeader, cs: 1, text: "leader chunkserver 1 (a:1) is offline"}})
	c.add(ref(1, 3), []finding{{reason: reasonNoLeader, text: "no leader has reported"}})
	c.add(ref(1, 4), []finding{{reason: reasonNoLeader, text: "no leader has reported"}})
	c.add(ref(1, 5), []finding{{reason: reasonUnderReplicated, cs: 9, silence: 4500 * time.Millisecond, text: "leader has not heard from chunkserver 9 for 4s"}})
	c.blocked = []*mdspb.BlockedCopyset{
		{Copyset: ref(1, 1), Reason: "only 1 of 3 voters are live: no quorum to add a replica"},
		{Copyset: ref(1, 8), Reason: "no online chunkserver with space"},
		{Copyset: ref(1, 9), Reason: "no online chunkserver with space"},
	}
	a := &app{}
	var got []string
	for _, l := range a.reportCauses(t.Context(), &c, topo, nil) {
		got = append(got, l.text)
	}
	want := []string{
		"chunkserver 1 (h1, a:1, zone z1) is offline: 2 copysets unhealthy: 2 without this replica, 1 without a leader (1:1, 1:2), " +
			"1 of them cannot be repaired now: only 1 of 3 voters are live: no quorum to add a replica",
		"chunkserver 2 (h2, a:2, zone z2) is offline: 1 copyset without this replica (1:1), 1 of them cannot be repaired now: only 1 of 3 voters are live: no quorum to add a replica",
		"chunkserver 4 (h4, a:4, zone z4) is unstable",
		"copyset 1:5: leader has not heard from chunkserver 9 for 4s",
		"no leader has reported: 2 copysets (1:3, 1:4)",
		"2 copysets cannot be repaired now: no online chunkserver with space (1:8, 1:9)",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("causes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
