package ops

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
)

func TestVolumeLifecycle(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(2)

	// Create: the size is rounded up to whole segments (8 MiB here).
	m := c.jsonRun(ExitOK, "create", "volume", "vol1", "--size", "10MiB", "--owner", "ops-test")
	if jstr(t, m, "action") != "created" || jnum(t, m, "requested_size") != 10<<20 || jnum(t, m, "volume.size") != 16<<20 ||
		jstr(t, m, "volume.name") != "vol1" || jstr(t, m, "volume.owner") != "ops-test" || jstr(t, m, "volume.logical_pool") != "lp0" {
		t.Errorf("create volume: %v", m)
	}
	st, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol1"})
	if err != nil || st.Volume.Size != 16<<20 {
		t.Fatalf("the MDS has %v, %v", st, err)
	}
	r := c.mustRun("create", "volume", "vol2", "--size", "16777216")
	golden(t, "create_volume", c.normalize(r.stdout, nil))

	// Refusals change nothing.
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"create", "volume", "vol1", "--size", "8MiB"}, ExitError, `create volume "vol1": volume "vol1" already exists`},
		{[]string{"create", "volume", "vol3", "--size", "lots"}, ExitUsage, `--size: invalid size "lots"`},
		{[]string{"create", "volume", "vol3", "--size", "0.3KiB"}, ExitUsage, `--size: size "0.3KiB" is not a whole number of bytes`},
		{[]string{"create", "volume", "vol3", "--size", "10XB"}, ExitUsage, `--size: size "10XB": unknown unit "XB"`},
		{[]string{"create", "volume", "vol3"}, ExitUsage, "--size is required"},
		{[]string{"create", "volume", "vol3", "--size", "8MiB", "--pool", "nope"}, ExitNotFound, `logical pool "nope" does not exist`},
		{[]string{"extend", "volume", "vol1", "--size", "8MiB"}, ExitUsage, `--allow-shrink`},
		{[]string{"extend", "volume", "nope", "--size", "8MiB"}, ExitNotFound, `volume "nope" does not exist`},
		{[]string{"query", "volume", "nope"}, ExitNotFound, `cairn-ops: volume "nope" does not exist`},
		{[]string{"delete", "volume", "nope", "--yes"}, ExitNotFound, `volume "nope" does not exist`},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
	if _, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol3"}); status.Code(err) != codes.NotFound {
		t.Errorf("vol3 exists after refused creates: %v", err)
	}
	// The JSON error object carries the same verdict.
	m = c.jsonRun(ExitNotFound, "query", "volume", "nope")
	if jstr(t, m, "error.code") != "not_found" || jnum(t, m, "error.exit_code") != ExitNotFound ||
		!strings.Contains(jstr(t, m, "error.message"), `volume "nope" does not exist`) {
		t.Errorf("error object %v", m)
	}

	// Extend; again to the same size is "unchanged".
	m = c.jsonRun(ExitOK, "extend", "volume", "vol1", "--size", "1GiB")
	if jstr(t, m, "action") != "extended" || jnum(t, m, "volume.size") != 1<<30 {
		t.Errorf("extend: %v", m)
	}
	if r := c.mustRun("extend", "volume", "vol1", "--size", "1GiB"); !strings.Contains(r.stdout, `volume "vol1" (id 1) unchanged: 1GiB`) {
		t.Errorf("same-size extend: %s", r.stdout)
	}

	// Query with an open session and an allocated segment.
	open, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol1", Writable: true, Client: "test-client"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol1", Offset: 0, Allocate: true}); err != nil {
		t.Fatal(err)
	}
	// Published read-only to a CSI node beside the writer.
	if _, err := c.conn.Volumes().RegisterNode(c.ctx, &mdspb.RegisterNodeRequest{Node: &mdspb.Node{Name: "node-r"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.conn.Volumes().PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vol1", Node: "node-r", ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	m = c.jsonRun(ExitOK, "query", "volume", "vol1")
	if jlen(t, m, "publications") != 1 || jstr(t, m, "publications.0.node") != "node-r" || !jbool(t, m, "publications.0.read_only") {
		t.Errorf("publications: %v", jget(t, m, "publications"))
	}
	if jnum(t, m, "volume.size") != 1<<30 || jnum(t, m, "volume.epoch") != open.Volume.Epoch || jnum(t, m, "volume.epoch") == 0 ||
		jnum(t, m, "volume.allocated_segments") != 1 || jnum(t, m, "volume.allocated_bytes") != 8<<20 {
		t.Errorf("query volume: %v", m)
	}
	if jlen(t, m, "sessions") != 1 || jstr(t, m, "sessions.0.session_id") != open.Session.SessionId ||
		jstr(t, m, "sessions.0.client") != "test-client" || !jbool(t, m, "sessions.0.writable") ||
		jnum(t, m, "sessions.0.epoch") != open.Volume.Epoch || jnum(t, m, "sessions.0.expires_unix") == 0 {
		t.Errorf("sessions: %v", jget(t, m, "sessions"))
	}
	r = c.mustRun("query", "volume", "vol1")
	golden(t, "query_volume", c.normalize(r.stdout, map[string]string{open.Session.SessionId: "SESSION"}))
	if _, err := c.conn.Volumes().UnpublishVolume(c.ctx, &mdspb.UnpublishVolumeRequest{Name: "vol1", Node: "node-r"}); err != nil {
		t.Fatal(err)
	}

	// Delete: refused while open for writing, unless --force.
	r = c.run("delete", "volume", "vol1", "--yes")
	if r.code != ExitError || !strings.Contains(r.stderr, `is open for writing by "test-client"`) {
		t.Errorf("delete of an open volume: exit %d, stderr %q", r.code, r.stderr)
	}
	// Delete asks for the name; anything else changes nothing.
	for _, answer := range []string{"", "y\n", "vol\n", "yes\n"} {
		r = c.runIn(answer, "delete", "volume", "vol2")
		if r.code != ExitError || !strings.Contains(r.stderr, `Type the volume name to confirm`) ||
			!strings.Contains(r.stderr, `delete volume "vol2": not confirmed; nothing was changed`) {
			t.Errorf("answer %q: exit %d, stderr %q", answer, r.code, r.stderr)
		}
	}
	if _, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: "vol2"}); err != nil {
		t.Fatalf("vol2 gone after unconfirmed deletes: %v", err)
	}
	r = c.runIn("vol2\n", "delete", "volume", "vol2")
	if r.code != ExitOK || !strings.Contains(r.stdout, `volume "vol2" (id 2) deleted`) {
		t.Errorf("confirmed delete: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	m = c.jsonRun(ExitOK, "delete", "volume", "vol1", "--yes", "--force")
	if jstr(t, m, "deleted") != "vol1" || jnum(t, m, "volume_id") != 1 {
		t.Errorf("delete --force: %v", m)
	}
	for _, name := range []string{"vol1", "vol2"} {
		if _, err := c.conn.Volumes().StatVolume(c.ctx, &mdspb.StatVolumeRequest{Name: name}); status.Code(err) != codes.NotFound {
			t.Errorf("%s after delete: %v", name, err)
		}
	}
}

func TestQueryChunk(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	c.mustRun("create", "volume", "v", "--size", "24MiB")
	seg, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "v", Offset: 8 << 20, Allocate: true})
	if err != nil {
		t.Fatal(err)
	}
	// 8 MiB + 3 MiB + 4 KiB: the fourth chunk of the second segment.
	off := uint64(8<<20 + 3<<20 + 4096)
	want := seg.Segment.Chunks[3]
	for _, arg := range []string{strconv.FormatUint(off, 10)} {
		m := c.jsonRun(ExitOK, "query", "chunk", "v", arg)
		if jnum(t, m, "chunk_id") != want.ChunkId || jstr(t, m, "copyset") != want.Copyset.Name() ||
			jnum(t, m, "logical_pool_id") != uint64(want.Copyset.LogicalPoolId) || jnum(t, m, "copyset_id") != uint64(want.Copyset.CopysetId) ||
			jnum(t, m, "chunk_index") != 3 || jnum(t, m, "chunk_offset") != 4096 || jnum(t, m, "segment_offset") != 8<<20 ||
			jnum(t, m, "offset") != off || jnum(t, m, "leader_id") != c.css[0].ID() || jnum(t, m, "chunk_size") != 1<<20 {
			t.Errorf("query chunk %s: %v (want chunk %d in %s)", arg, m, want.ChunkId, want.Copyset.Name())
		}
		if jlen(t, m, "replicas") != 3 {
			t.Fatalf("replicas: %v", jget(t, m, "replicas"))
		}
		for i, d := range c.css {
			p := fmt.Sprintf("replicas.%d", i)
			if jnum(t, m, p+".chunkserver_id") != d.ID() || jstr(t, m, p+".address") != d.Addr ||
				jbool(t, m, p+".leader") != (i == 0) || jstr(t, m, p+".online_state") != "online" {
				t.Errorf("%s = %v", p, jget(t, m, p))
			}
		}
	}
	// Sizes work as offsets too.
	m := c.jsonRun(ExitOK, "query", "chunk", "v", "9MiB")
	if jnum(t, m, "chunk_id") != seg.Segment.Chunks[1].ChunkId {
		t.Errorf("query chunk v 9MiB: chunk %d, want %d", jnum(t, m, "chunk_id"), seg.Segment.Chunks[1].ChunkId)
	}
	// Which copyset a chunk lands in depends on the MDS's order of its
	// copysets, which is not fixed.
	r := c.mustRun("query", "chunk", "v", strconv.FormatUint(off, 10))
	golden(t, "query_chunk", regexp.MustCompile(`(copyset:\s+)\d+:\d+`).ReplaceAllString(c.normalize(r.stdout, nil), "${1}P:C"))

	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"query", "chunk", "v", "1MiB"}, ExitNotFound, `offset 1048576 of volume "v" is not allocated: its segment at 0 was never written, so it reads as zeros`},
		{[]string{"query", "chunk", "v", "24MiB"}, ExitUsage, `offset 25165824 is beyond the end of volume "v" (25165824 bytes)`},
		{[]string{"query", "chunk", "v", "--", "-1"}, ExitUsage, `offset: invalid size "-1"`},
		{[]string{"query", "chunk", "nope", "0"}, ExitNotFound, `volume "nope" does not exist`},
		{[]string{"query", "chunk", "v"}, ExitUsage, `takes 2 argument(s): VOLUME OFFSET; got 1`},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
}

func TestUpdateLeader(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	from, to := c.css[0].ID(), c.css[1].ID()

	m := c.jsonRun(ExitOK, "update", "leader", "--copyset", "1:2", "--to", strconv.FormatUint(to, 10))
	if jstr(t, m, "copyset") != "1:2" || jnum(t, m, "from") != from || jnum(t, m, "to") != to || jbool(t, m, "done") {
		t.Errorf("update leader: %v", m)
	}
	ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(ops.Operators) != 1 || ops.Operators[0].Kind != mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER ||
		ops.Operators[0].Target.GetChunkserverId() != to || ops.Operators[0].Copyset.GetCopysetId() != 2 {
		t.Fatalf("operators at the MDS: %v", ops.Operators)
	}
	// The leader gets it with its next heartbeat answer.
	soon.Succeeds(t, 10*time.Second, func() error {
		resp, err := c.css[0].Heartbeat(c.ctx, c.conn.Heartbeats())
		if err != nil {
			return err
		}
		if len(resp.Operators) != 1 {
			return fmt.Errorf("heartbeat answer carries %d operators", len(resp.Operators))
		}
		return nil
	})

	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"update", "leader", "--copyset", "1:2", "--to", strconv.FormatUint(to, 10)}, ExitError, "already has a pending operator"},
		{[]string{"update", "leader", "--copyset", "1:1", "--to", "99"}, ExitUsage, "chunkserver 99 is not a member of copyset 1:1"},
		{[]string{"update", "leader", "--copyset", "1:1", "--to", strconv.FormatUint(from, 10)}, ExitError, "already leads copyset 1:1"},
		{[]string{"update", "leader", "--copyset", "1:9", "--to", "2"}, ExitNotFound, "copyset 1:9 does not exist"},
		{[]string{"update", "leader", "--copyset", "7:1", "--to", "2"}, ExitNotFound, `logical pool "7" does not exist`},
		{[]string{"update", "leader", "--copyset", "x", "--to", "2"}, ExitUsage, `copyset id "x": want POOL:COPYSET`},
		{[]string{"update", "leader", "--to", "2"}, ExitUsage, `update leader needs the copyset`},
		{[]string{"update", "leader", "1:9", "--to", "2"}, ExitNotFound, "copyset 1:9 does not exist"},
		{[]string{"update", "leader", "1:2", "--copyset", "1:3", "--to", "2"}, ExitUsage, "copyset 1:2 given twice"},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}

	// --wait returns once the MDS sees the new leader. The doubles stand in
	// for the transfer: the target starts reporting itself leader at a
	// newer term once the operator is queued.
	r := c.waitedLeaderTransfer(t, "-o", "json", "update", "leader", "lp0:3", "--to", strconv.FormatUint(to, 10), "--wait", "20s")
	m = decodeJSON(t, r.stdout)
	if !jbool(t, m, "done") || jnum(t, m, "to") != to || jnum(t, m, "from") != from {
		t.Errorf("update leader --wait: %v", m)
	}
}

func TestUnreachableMDS(t *testing.T) {
	r := runOps(t, "", "--mds", "127.0.0.1:1", "--mds", "127.0.0.1:2", "--timeout", "300ms", "list", "volume")
	if r.code != ExitUnreachable {
		t.Fatalf("exit %d, want %d", r.code, ExitUnreachable)
	}
	if !strings.Contains(r.stderr, "no MDS leader answered (tried 127.0.0.1:1, 127.0.0.1:2)") {
		t.Errorf("stderr does not name the addresses tried: %q", r.stderr)
	}
	r = runOps(t, "", "-o", "json", "--mds", "127.0.0.1:1", "--timeout", "300ms", "status")
	if r.code != ExitUnreachable {
		t.Fatalf("exit %d, want %d", r.code, ExitUnreachable)
	}
	m := decodeJSON(t, r.stdout)
	if jstr(t, m, "error.code") != "unreachable" || !strings.Contains(jstr(t, m, "error.message"), "tried 127.0.0.1:1") {
		t.Errorf("JSON error: %v", m)
	}
	// Addresses that answer but are no MDS: TestWrongMDSAddress.
}

func TestMDSAddressFromEnvironment(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(1)
	t.Setenv(EnvMDS, "127.0.0.1:1,"+c.mds.Addr())
	r := runOps(t, "", "-o", "json", "--timeout", "10s", "list", "pool")
	if r.code != ExitOK {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	if m := decodeJSON(t, r.stdout); jstr(t, m, "logical_pools.0.name") != "lp0" {
		t.Errorf("list pool via %s: %v", EnvMDS, m)
	}
	// --mds wins over the environment.
	r = runOps(t, "", "--mds", "127.0.0.1:1", "--timeout", "300ms", "list", "pool")
	if r.code != ExitUnreachable || !strings.Contains(r.stderr, "tried 127.0.0.1:1)") {
		t.Errorf("--mds over %s: exit %d, stderr %q", EnvMDS, r.code, r.stderr)
	}
}

func TestUsageErrors(t *testing.T) {
	// Plain cairn-ops prints its help and exits with the usage code.
	if r := runOps(t, ""); r.code != ExitUsage || !strings.Contains(r.stdout, "Available Commands") {
		t.Errorf("plain cairn-ops: exit %d, stdout %q", r.code, r.stdout)
	}
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"list"}, "cairn-ops: list needs one of: chunkserver, copyset, node, operator, pool, server, session, snapshot, trash, volume, zone"},
		{[]string{"list", "disks"}, `unknown command "disks" for list;`},
		{[]string{"status", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"-o", "yaml", "status"}, `unknown output format "yaml": use table or json`},
		{[]string{"--timeout", "0s", "status"}, "--timeout 0s must be positive"},
		{[]string{"check", "copyset", "1:1", "1:2"}, "takes at most one argument"},
		{[]string{"check", "consistency"}, "takes 1 argument(s): VOLUME; got 0"},
	} {
		r := runOps(t, "", append([]string{"--mds", "127.0.0.1:1", "--timeout", "300ms"}, tc.args...)...)
		if r.code != ExitUsage || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, ExitUsage, tc.msg)
		}
	}
	if r := runOps(t, "", "--help"); r.code != ExitOK || !strings.Contains(r.stdout, "Exit codes:") {
		t.Errorf("--help: exit %d\n%s", r.code, r.stdout)
	}
}

func TestFormatBytes(t *testing.T) {
	for n, want := range map[uint64]string{
		0: "0B", 512: "512B", 1024: "1KiB", 1536: "1.5KiB", 10 << 30: "10GiB", 3 << 40: "3TiB",
		811659522048: "755.9GiB", 3000 << 20: "2.9GiB",
	} {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestSessionsNodesAndRename(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	c.mustRun("create", "volume", "va", "--size", "24MiB")
	c.mustRun("create", "volume", "vb", "--size", "24MiB")
	vols := c.conn.Volumes()
	wa, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "va", Writable: true, Client: "host-a/pid-1"})
	if err != nil {
		t.Fatal(err)
	}
	rb, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vb", Client: "host-b/pid-2"})
	if err != nil {
		t.Fatal(err)
	}
	// Sessions across volumes, and of one.
	m := c.jsonRun(ExitOK, "list", "session")
	if jlen(t, m, "sessions") != 2 || jstr(t, m, "sessions.0.volume") != "va" || jstr(t, m, "sessions.1.volume") != "vb" ||
		!jbool(t, m, "sessions.0.writable") || jbool(t, m, "sessions.1.writable") {
		t.Fatalf("list session: %v", m)
	}
	r := c.mustRun("list", "session")
	golden(t, "list_session", c.normalize(r.stdout, map[string]string{wa.Session.SessionId: "SESSION_A", rb.Session.SessionId: "SESSION_B"}))
	if m = c.jsonRun(ExitOK, "list", "session", "vb"); jlen(t, m, "sessions") != 1 {
		t.Fatalf("list session vb: %v", m)
	}
	// Closing a stale session; an unknown one is NOT FOUND and changes
	// nothing.
	if r := c.run("delete", "session", "va", "nosuch"); r.code != ExitNotFound || !strings.Contains(r.stderr, `volume "va" has no open session nosuch`) {
		t.Fatalf("delete of an unknown session: exit %d, %s", r.code, r.stderr)
	}
	if m = c.jsonRun(ExitOK, "delete", "session", "va", wa.Session.SessionId); jstr(t, m, "closed") != wa.Session.SessionId {
		t.Fatalf("delete session: %v", m)
	}
	if m = c.jsonRun(ExitOK, "list", "session", "va"); jlen(t, m, "sessions") != 0 {
		t.Fatalf("sessions of va after closing: %v", m)
	}
	// The writer gone, the volume deletes without --force.
	if r := c.run("delete", "volume", "va", "--yes"); r.code != ExitOK {
		t.Fatalf("delete after closing the stale session: exit %d, %s", r.code, r.stderr)
	}

	// CSI nodes and what is published to them.
	if _, err := vols.RegisterNode(c.ctx, &mdspb.RegisterNodeRequest{Node: &mdspb.Node{Name: "worker-1", Topology: map[string]string{"zone": "a"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.RegisterNode(c.ctx, &mdspb.RegisterNodeRequest{Node: &mdspb.Node{Name: "worker-2"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := vols.PublishVolume(c.ctx, &mdspb.PublishVolumeRequest{Name: "vb", Node: "worker-1", ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	m = c.jsonRun(ExitOK, "list", "node")
	if jlen(t, m, "nodes") != 2 || jstr(t, m, "nodes.0.name") != "worker-1" || jstr(t, m, "nodes.0.volumes.0") != "vb (ro)" ||
		jstr(t, m, "nodes.0.topology.zone") != "a" || jlen(t, m, "nodes.1.volumes") != 0 {
		t.Fatalf("list node: %v", m)
	}
	r = c.mustRun("list", "node")
	golden(t, "list_node", c.normalize(r.stdout, nil))

	// Rename: the session and the publication follow the volume.
	m = c.jsonRun(ExitOK, "rename", "volume", "vb", "vc")
	if jstr(t, m, "renamed") != "vb" || jstr(t, m, "volume.name") != "vc" {
		t.Fatalf("rename: %v", m)
	}
	if m = c.jsonRun(ExitOK, "list", "node"); jstr(t, m, "nodes.0.volumes.0") != "vc (ro)" {
		t.Fatalf("publication after the rename: %v", m)
	}
	if m = c.jsonRun(ExitOK, "list", "session", "vc"); jlen(t, m, "sessions") != 1 || jstr(t, m, "sessions.0.volume") != "vc" {
		t.Fatalf("session after the rename: %v", m)
	}
	c.mustRun("create", "volume", "vd", "--size", "24MiB")
	if r := c.run("rename", "volume", "vc", "vd"); r.code == ExitOK || !strings.Contains(r.stderr, `volume "vd" already exists`) {
		t.Fatalf("rename onto another volume: exit %d, %s", r.code, r.stderr)
	}
	if r := c.run("rename", "volume", "nosuch", "x"); r.code != ExitNotFound {
		t.Fatalf("rename of an unknown volume: exit %d, %s", r.code, r.stderr)
	}
}

func TestCreateWarnsAboutOvercommit(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	// Each chunkserver reports 100 used, 900 free and 2000 growable chunk
	// files of 1 MiB: the pool holds 3 x 3000 MiB / 3 replicas.
	if r := c.mustRun("create", "volume", "fits", "--size", "512MiB"); strings.Contains(r.stderr, "warning") {
		t.Fatalf("warning for a volume that fits: %s", r.stderr)
	}
	r := c.mustRun("create", "volume", "big", "--size", "4GiB")
	if !strings.Contains(r.stderr, "cairn-ops: warning: the volumes of pool lp0 now provision 4.5GiB, 1.5x the 2.9GiB its chunkservers can hold with 3 replicas") {
		t.Fatalf("no overcommit warning: %q", r.stderr)
	}
	if !strings.Contains(r.stdout, `volume "big" (id 2) created`) {
		t.Fatalf("the volume was not created: %s", r.stdout)
	}
}

// waitedLeaderTransfer runs an update leader --wait of copyset 1:3 from the
// first double to the second (args), makes the doubles report the transfer
// once its operator is queued (beside one already queued), and returns the
// command's successful result.
func (c *doubleCluster) waitedLeaderTransfer(t *testing.T, args ...string) runResult {
	t.Helper()
	done := make(chan runResult, 1)
	go func() { done <- c.run(args...) }()
	soon.Succeeds(t, 10*time.Second, func() error {
		ops, err := c.conn.Cluster().ListOperators(c.ctx, &mdspb.ListOperatorsRequest{})
		if err != nil {
			return err
		}
		if len(ops.Operators) != 2 {
			return errors.New("operator for copyset 1:3 not queued yet")
		}
		return nil
	})
	c.css[0].SetLeading(ref(1, 3), false, 2)
	c.css[1].SetLeading(ref(1, 3), true, 2)
	r := <-done
	if r.code != ExitOK {
		t.Fatalf("update leader --wait: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	return r
}
