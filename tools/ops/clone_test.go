package ops

import (
	"bytes"
	"context"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/client"
	"cairn.io/cairn/test/cluster"
)

// TestCloneCommands: create volume --from makes a clone that reads its
// snapshot; list and query show it; delete snapshot names the clone it
// refuses for; flatten copies what the clone reads from the snapshot and,
// with --wait, returns once the source is released, after which the
// snapshot is deleted and the clone reads the same.
func TestCloneCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster of three chunkservers")
	}
	// A short session lease: the source is released one lease after the
	// flatten.
	c := &liveCluster{Cluster: cluster.Start(t, cluster.Options{SessionLease: 2 * time.Second}), t: t}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "64MiB")
	open := func(name string, o client.Options) *client.Volume {
		t.Helper()
		o.Logger = cluster.Logger()
		v, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, name, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = v.Close() })
		return v
	}
	w := open("vol", client.Options{})
	a := make([]byte, 3<<20)
	_, _ = rand.Read(a)
	if _, err := w.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	c.jsonRun(ExitOK, "create", "snapshot", "vol", "s1")

	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"create", "volume", "cl"}, ExitUsage, "--size is required"},
		{[]string{"create", "volume", "cl", "--from", "vol"}, ExitUsage, "want VOLUME@SNAPSHOT"},
		{[]string{"create", "volume", "cl", "--from", "vol@nope"}, ExitNotFound, `has no snapshot "nope"`},
		{[]string{"flatten", "vol"}, ExitError, "is not a clone"},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
	start := time.Now()
	m := c.jsonRun(ExitOK, "create", "volume", "cl", "--from", "vol@s1")
	took := time.Since(start)
	if jstr(t, m, "volume.source") != "vol@s1" || jnum(t, m, "volume.size") != 64<<20 || jbool(t, m, "volume.flattened") {
		t.Fatalf("create volume --from: %v", m)
	}
	t.Logf("clone of a 64 MiB volume with 3 MiB written created in %v", took)
	m = c.jsonRun(ExitOK, "list", "snapshot", "vol")
	if jnum(t, m, "snapshots.0.clones") != 1 {
		t.Fatalf("list snapshot: %v", m)
	}
	if r := c.mustRun("query", "volume", "cl"); !strings.Contains(r.stdout, "vol@s1 (not flattened)") {
		t.Fatalf("query volume: %q", r.stdout)
	}
	cl := open("cl", client.Options{})
	c2 := bytes.Repeat([]byte{7}, 512)
	if _, err := cl.WriteAt(ctx, c2, 4096+512); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(a)
	copy(want[4096+512:], c2)
	if r := c.run("delete", "snapshot", "vol", "s1", "--yes"); r.code != ExitError || !strings.Contains(r.stderr, "clones that read from it: cl") {
		t.Fatalf("delete a snapshot with a clone: exit %d, %q", r.code, r.stderr)
	}
	m = c.jsonRun(ExitOK, "flatten", "cl", "--wait", "1m")
	if jstr(t, m, "source") != "vol@s1" || !jbool(t, m, "released") || jnum(t, m, "copied_bytes") < 2<<20 {
		t.Fatalf("flatten: %v", m)
	}
	t.Logf("flatten copied %d bytes in %.2fs", jnum(t, m, "copied_bytes"), m["took_seconds"])
	c.mustRun("delete", "snapshot", "vol", "s1", "--yes")
	got := make([]byte, len(a))
	if _, err := open("cl", client.Options{ReadOnly: true}).ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the flattened clone after its snapshot was deleted: equal %v, %v", bytes.Equal(got, want), err)
	}
	if r := c.mustRun("query", "volume", "cl"); strings.Contains(r.stdout, "clone of") {
		t.Fatalf("query of a released clone: %q", r.stdout)
	}
}
