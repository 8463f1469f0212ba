package ops

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
)

// TestDrainVerbs drives update chunkserver/server/zone, delete chunkserver
// and list operator against a real MDS whose chunkservers are doubles (they
// carry no operator out, so the drain's first moves stay queued).
func TestDrainVerbs(t *testing.T) {
	c := newDoubleCluster(t, 4)
	c.mustRun("create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", "3")
	for _, d := range c.css {
		d.LeadFirstPeers()
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		resp, err := c.conn.Topology().ListCopysets(c.ctx, &mdspb.ListCopysetsRequest{})
		if err != nil {
			return err
		}
		for _, cs := range resp.Copysets {
			if cs.LeaderId == 0 {
				return fmt.Errorf("copyset %s has no leader", cs.Id.Name())
			}
		}
		return nil
	})
	id := c.css[0].ID()
	ids := strconv.FormatUint(id, 10)

	r := c.mustRun("update", "chunkserver", ids, "--state", "retiring")
	if !strings.Contains(r.stdout, "chunkserver "+ids+" (host-0, zone zone-0) is retiring") {
		t.Fatalf("update chunkserver: %q", r.stdout)
	}
	m := c.jsonRun(ExitOK, "list", "chunkserver")
	if jstr(t, m, "chunkservers.0.rw_state") != "retiring" {
		t.Fatalf("list chunkserver after retiring: %v", m)
	}
	// The drain queues moves; list operator shows them with their reason.
	soon.Succeeds(t, 10*time.Second, func() error {
		m := c.jsonRun(ExitOK, "list", "operator")
		if jlen(t, m, "operators") == 0 {
			return fmt.Errorf("no operator queued yet")
		}
		if jstr(t, m, "operators.0.reason") != "drain" || jstr(t, m, "operators.0.kind") != "add-peer" {
			t.Fatalf("operator: %v", m)
		}
		return nil
	})
	r = c.run("list", "operator")
	if !strings.Contains(r.stdout, "add-peer") || !strings.Contains(r.stdout, "drain") || !strings.HasPrefix(r.stdout, "COPYSET") {
		t.Fatalf("list operator table: %q", r.stdout)
	}
	// status is not healthy while a drain runs, and says why.
	st := c.run("status")
	if st.code != ExitUnhealthy || !strings.Contains(st.stdout, "is retiring") || !strings.Contains(st.stdout, "recovery:") {
		t.Fatalf("status during a drain: exit %d\n%s", st.code, st.stdout)
	}
	// In use: cannot be deleted.
	r = c.run("delete", "chunkserver", ids)
	if r.code != ExitError || !strings.Contains(r.stderr, "it is retiring; wait until it reads retired") {
		t.Fatalf("delete chunkserver in use: exit %d, %q", r.code, r.stderr)
	}
	// Cancel.
	r = c.mustRun("update", "chunkserver", ids, "--state", "readwrite")
	if !strings.Contains(r.stdout, "is readwrite") {
		t.Fatalf("cancel: %q", r.stdout)
	}
	// A zone by name, a server by host name.
	m = c.jsonRun(ExitOK, "update", "zone", "zone-1", "--state", "retiring")
	if jlen(t, m, "chunkservers") != 1 || jstr(t, m, "chunkservers.0.zone") != "zone-1" {
		t.Fatalf("update zone: %v", m)
	}
	m = c.jsonRun(ExitOK, "update", "server", "host-1", "--state", "readwrite")
	if jstr(t, m, "chunkservers.0.rw_state") != "readwrite" {
		t.Fatalf("update server: %v", m)
	}

	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"update", "chunkserver", ids, "--state", "retired"}, ExitUsage, "--state retired cannot be set"},
		{[]string{"update", "chunkserver", ids, "--state", "gone"}, ExitUsage, `--state "gone": want retiring or readwrite`},
		{[]string{"update", "chunkserver", "x", "--state", "retiring"}, ExitUsage, `chunkserver id "x"`},
		{[]string{"update", "chunkserver", "99", "--state", "retiring"}, ExitNotFound, "chunkserver 99 does not exist"},
		{[]string{"update", "zone", "nowhere", "--state", "retiring"}, ExitNotFound, `no zone is named "nowhere"`},
		{[]string{"update", "server", "nohost", "--state", "retiring"}, ExitNotFound, `no server has host name "nohost"`},
		{[]string{"update", "chunkserver", ids}, ExitUsage, `required flag(s) "state" not set`},
		{[]string{"delete", "chunkserver", "99"}, ExitNotFound, "chunkserver 99 does not exist"},
		{[]string{"delete", "chunkserver", ids}, ExitError, "still holds"},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
	// Nothing changed by the refusals.
	resp, err := c.conn.Topology().GetChunkServer(c.ctx, &mdspb.GetChunkServerRequest{ChunkserverId: id})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Chunkserver.RwState != mdspb.RWState_RW_STATE_READWRITE {
		t.Fatalf("chunkserver %d is %s after refused changes", id, resp.Chunkserver.RwState)
	}
}

// TestStatusWarnsOfFullChunkServers: status is not healthy while a
// chunkserver is past the space warning, and says which and how full.
func TestStatusWarnsOfFullChunkServers(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(2)
	c.css[1].SetCapacity(&mdspb.Capacity{DiskTotalBytes: 100 << 30, DiskFreeBytes: 60 << 30, PoolUsedChunks: 850, PoolFreeChunks: 150, PoolTargetChunks: 1000, FormatPercent: 100})
	c.css[2].SetCapacity(&mdspb.Capacity{DiskTotalBytes: 100 << 30, DiskFreeBytes: 60 << 30, PoolUsedChunks: 1000, PoolFreeChunks: 0, PoolTargetChunks: 1000, FormatPercent: 100})
	soon.Succeeds(t, 10*time.Second, func() error {
		r := c.run("status")
		warn := fmt.Sprintf("chunkserver %d (host-1, zone zone-1) is 85%% full (warning at 80%%)", c.css[1].ID())
		full := fmt.Sprintf("chunkserver %d (host-2, zone zone-2) is 100%% full: it takes no new replicas (full at 95%%)", c.css[2].ID())
		if r.code != ExitUnhealthy || !strings.Contains(r.stdout, warn) || !strings.Contains(r.stdout, full) {
			return fmt.Errorf("status: exit %d\n%s", r.code, r.stdout)
		}
		return nil
	})
}
