package ops

import (
	"strings"
	"testing"
)

// TestSnapshotCommands: create, list and delete snapshots, with the
// refusals an operator meets.
func TestSnapshotCommands(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(2)
	c.mustRun("create", "volume", "vol1", "--size", "16MiB")

	m := c.jsonRun(ExitOK, "create", "snapshot", "vol1", "s1")
	if jstr(t, m, "snapshot.name") != "s1" || jnum(t, m, "snapshot.seq") != 1 || jnum(t, m, "snapshot.size") != 16<<20 || jstr(t, m, "snapshot.status") != "ready" {
		t.Fatalf("create snapshot: %v", m)
	}
	if r := c.mustRun("create", "snapshot", "vol1", "s2"); !strings.Contains(r.stdout, `snapshot "s2" of volume "vol1" taken`) || !strings.Contains(r.stdout, "sequence number 2") {
		t.Fatalf("create snapshot, table: %q", r.stdout)
	}
	m = c.jsonRun(ExitOK, "list", "snapshot", "vol1")
	if jlen(t, m, "snapshots") != 2 || jstr(t, m, "snapshots.0.name") != "s1" || jstr(t, m, "snapshots.1.name") != "s2" {
		t.Fatalf("list snapshot: %v", m)
	}
	for _, tc := range []struct {
		stdin string
		args  []string
		code  int
		msg   string
	}{
		{"", []string{"create", "snapshot", "nope", "s1"}, ExitNotFound, `volume "nope" does not exist`},
		{"", []string{"create", "snapshot", "vol1", "s1"}, ExitError, `already has a snapshot "s1"`},
		{"", []string{"create", "snapshot", "vol1"}, ExitUsage, "VOLUME NAME"},
		{"", []string{"delete", "snapshot", "vol1", "nope", "--yes"}, ExitNotFound, `has no snapshot "nope"`},
		{"s2\n", []string{"delete", "snapshot", "vol1", "s1"}, ExitError, "not confirmed"},
		{"", []string{"delete", "volume", "vol1", "--yes"}, ExitError, "snapshot(s); delete them first"},
	} {
		r := c.runIn(tc.stdin, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
	r := c.runIn("s1\n", "delete", "snapshot", "vol1", "s1")
	if r.code != ExitOK || !strings.Contains(r.stdout, `snapshot "s1" of volume "vol1" deleted`) {
		t.Fatalf("delete snapshot: exit %d, %q %q", r.code, r.stdout, r.stderr)
	}
	// Unreadable at once; its record goes once every chunk is trimmed
	// (which these chunkserver doubles do not do).
	m = c.jsonRun(ExitOK, "list", "snapshot", "vol1")
	if n := jlen(t, m, "snapshots"); n == 2 && jstr(t, m, "snapshots.0.status") != "deleting" || n < 1 || n > 2 {
		t.Fatalf("after delete: %v", m)
	}
}
