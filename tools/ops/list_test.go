package ops

import (
	"fmt"
	"strings"
	"testing"

	"cairn.io/cairn/api/mdspb"
)

func TestListCommands(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	c.mustRun("create", "volume", "vol-b", "--size", "16MiB", "--owner", "alice")
	c.mustRun("create", "volume", "vol-a", "--size", "8MiB")
	if _, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol-b", Offset: 8 << 20, Allocate: true}); err != nil {
		t.Fatal(err)
	}

	t.Run("zone", func(t *testing.T) {
		m := c.jsonRun(ExitOK, "list", "zone")
		if n := jlen(t, m, "zones"); n != 3 {
			t.Fatalf("%d zones, want 3", n)
		}
		for i := range 3 {
			p := fmt.Sprintf("zones.%d", i)
			if got := jstr(t, m, p+".name"); got != fmt.Sprintf("zone-%d", i) {
				t.Errorf("%s.name = %q", p, got)
			}
			if jstr(t, m, p+".physical_pool") != "pool0" || jnum(t, m, p+".servers") != 1 || jnum(t, m, p+".chunkservers") != 1 {
				t.Errorf("%s = %v", p, jget(t, m, p))
			}
		}
		golden(t, "list_zone", c.normalize(c.mustRun("list", "zone").stdout, nil))
	})
	t.Run("server", func(t *testing.T) {
		m := c.jsonRun(ExitOK, "list", "server")
		if n := jlen(t, m, "servers"); n != 3 {
			t.Fatalf("%d servers, want 3", n)
		}
		if jstr(t, m, "servers.1.hostname") != "host-1" || jstr(t, m, "servers.1.zone") != "zone-1" || jnum(t, m, "servers.1.chunkservers") != 1 {
			t.Errorf("servers.1 = %v", jget(t, m, "servers.1"))
		}
		golden(t, "list_server", c.normalize(c.mustRun("list", "servers").stdout, nil))
	})
	t.Run("chunkserver", func(t *testing.T) {
		m := c.jsonRun(ExitOK, "list", "chunkserver")
		if n := jlen(t, m, "chunkservers"); n != 3 {
			t.Fatalf("%d chunkservers, want 3", n)
		}
		for i, d := range c.css {
			p := fmt.Sprintf("chunkservers.%d", i)
			if jnum(t, m, p+".id") != d.ID() || jstr(t, m, p+".address") != d.Addr || jstr(t, m, p+".online_state") != "online" ||
				jstr(t, m, p+".rw_state") != "readwrite" || jnum(t, m, p+".copysets") != 3 || jstr(t, m, p+".data_dir") != d.DataDir {
				t.Errorf("%s = %v", p, jget(t, m, p))
			}
			wantLeaders := uint64(0)
			if i == 0 {
				wantLeaders = 3
			}
			if got := jnum(t, m, p+".leaders"); got != wantLeaders {
				t.Errorf("%s.leaders = %d, want %d", p, got, wantLeaders)
			}
			if jnum(t, m, p+".disk_total_bytes") != 100<<30 || jnum(t, m, p+".pool_free_chunks") != 900 || jnum(t, m, p+".format_percent") != 100 {
				t.Errorf("%s capacity = %v", p, jget(t, m, p))
			}
			if jnum(t, m, p+".last_heartbeat_unix") == 0 {
				t.Errorf("%s has no heartbeat time", p)
			}
		}
		golden(t, "list_chunkserver", c.normalize(c.mustRun("list", "cs").stdout, nil))
	})
	t.Run("pool", func(t *testing.T) {
		m := c.jsonRun(ExitOK, "list", "pool")
		if jstr(t, m, "physical_pools.0.name") != "pool0" || jnum(t, m, "physical_pools.0.zones") != 3 || jnum(t, m, "physical_pools.0.chunkservers") != 3 {
			t.Errorf("physical_pools = %v", jget(t, m, "physical_pools"))
		}
		lp := "logical_pools.0"
		if jstr(t, m, lp+".name") != "lp0" || jstr(t, m, lp+".status") != "ready" || jnum(t, m, lp+".copysets") != 3 ||
			jnum(t, m, lp+".replicas") != 3 || jnum(t, m, lp+".copysets_per_chunkserver") != 3 || jstr(t, m, lp+".physical_pool") != "pool0" {
			t.Errorf("%s = %v", lp, jget(t, m, lp))
		}
		golden(t, "list_pool", c.normalize(c.mustRun("list", "pool").stdout, nil))
	})
	t.Run("copyset", func(t *testing.T) {
		m := c.jsonRun(ExitOK, "list", "copyset", "--pool", "lp0")
		if n := jlen(t, m, "copysets"); n != 3 {
			t.Fatalf("%d copysets, want 3", n)
		}
		for i := range 3 {
			p := fmt.Sprintf("copysets.%d", i)
			if jstr(t, m, p+".copyset") != fmt.Sprintf("1:%d", i+1) || jnum(t, m, p+".leader_id") != c.css[0].ID() ||
				!jbool(t, m, p+".healthy") || jlen(t, m, p+".peers") != 3 || jlen(t, m, p+".reasons") != 0 {
				t.Errorf("%s = %v", p, jget(t, m, p))
			}
			if jstr(t, m, p+".peers.2.address") != c.css[2].Addr {
				t.Errorf("%s.peers.2 = %v", p, jget(t, m, p+".peers.2"))
			}
		}
		golden(t, "list_copyset", c.normalize(c.mustRun("list", "copyset").stdout, nil))
		if r := c.run("list", "copyset", "--pool", "nope"); r.code != ExitNotFound || !strings.Contains(r.stderr, `logical pool "nope" does not exist`) {
			t.Errorf("unknown pool: exit %d, stderr %q", r.code, r.stderr)
		}
	})
	t.Run("volume", func(t *testing.T) {
		m := c.jsonRun(ExitOK, "list", "volume")
		if n := jlen(t, m, "volumes"); n != 2 {
			t.Fatalf("%d volumes, want 2", n)
		}
		// Sorted by name.
		if jstr(t, m, "volumes.0.name") != "vol-a" || jstr(t, m, "volumes.1.name") != "vol-b" {
			t.Errorf("volumes = %v", jget(t, m, "volumes"))
		}
		b := "volumes.1"
		if jnum(t, m, b+".size") != 16<<20 || jnum(t, m, b+".allocated_segments") != 1 || jnum(t, m, b+".allocated_bytes") != 8<<20 ||
			jstr(t, m, b+".owner") != "alice" || jstr(t, m, b+".logical_pool") != "lp0" || jstr(t, m, b+".status") != "created" ||
			jnum(t, m, b+".chunk_size") != 1<<20 || jnum(t, m, b+".segment_size") != 8<<20 || jnum(t, m, b+".created_unix") == 0 {
			t.Errorf("%s = %v", b, jget(t, m, b))
		}
		golden(t, "list_volume", c.normalize(c.mustRun("list", "volume").stdout, nil))
	})
}
