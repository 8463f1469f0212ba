package ops

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

// TestExportImportRollback: a whole export of one snapshot and an
// incremental one of the next, imported into a new volume, give the second
// snapshot byte for byte; the incremental one holds only what changed; a
// damaged export is refused; rollback makes a volume read as a snapshot
// again, and is refused while a client has the volume open for writing.
func TestExportImportRollback(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster of three chunkservers")
	}
	c := startLive(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "64MiB")
	open := func(name string, o client.Options) *client.Volume {
		t.Helper()
		o.Logger = cluster.Logger()
		v, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, name, o)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	image := func(v *client.Volume) []byte {
		t.Helper()
		b := make([]byte, v.Size())
		if _, err := v.ReadAt(ctx, b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	w := open("vol", client.Options{})
	a := make([]byte, 4<<20)
	_, _ = rand.Read(a)
	if _, err := w.WriteAt(ctx, a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(ctx, a[:1<<20], 10<<20); err != nil {
		t.Fatal(err)
	}
	c.jsonRun(ExitOK, "create", "snapshot", "vol", "s1")
	if _, err := w.WriteAt(ctx, bytes.Repeat([]byte("B"), 1<<20), 1<<20); err != nil { // one block changes
		t.Fatal(err)
	}
	if err := w.UnmapAt(ctx, 10<<20, 1<<20); err != nil { // one block becomes zeros
		t.Fatal(err)
	}
	c.jsonRun(ExitOK, "create", "snapshot", "vol", "s2")
	// du counts what the chunks keep for s1: the block rewritten and the
	// chunk unmapped (zeroed through copy on write, not deleted).
	if m := c.jsonRun(ExitOK, "du", "vol"); jnum(t, m, "volumes.0.snapshot_bytes") != 2<<20 {
		t.Fatalf("du after two blocks changed under a snapshot: %v", m)
	}
	// status counts them too (two version files of 1 MiB chunks, each
	// full, on each of three replicas), once every chunkserver reported.
	soon.Succeeds(t, 10*time.Second, func() error {
		m := c.jsonRun(ExitOK, "status")
		if jnum(t, m, "space.snapshot_kept_bytes") != 3*2<<20 || jnum(t, m, "space.snapshot_file_bytes") != 3*2<<20 {
			return fmt.Errorf("status space %v", jget(t, m, "space"))
		}
		return nil
	})

	full, incr := filepath.Join(dir, "s1.img"), filepath.Join(dir, "s2-since-s1.img")
	m := c.jsonRun(ExitOK, "export", "vol@s1", full)
	if jnum(t, m, "data_bytes") != 5<<20 || jnum(t, m, "zero_bytes") != 59<<20 {
		t.Fatalf("whole export: %v", m)
	}
	m = c.jsonRun(ExitOK, "export", "vol@s2", "--since", "s1", incr)
	if jnum(t, m, "data_bytes") != 1<<20 || jnum(t, m, "zero_bytes") != 1<<20 || jnum(t, m, "records") != 2 {
		t.Fatalf("incremental export: %v", m)
	}
	if r := c.run("export", "vol@s1", full); r.code != ExitUsage || !strings.Contains(r.stderr, "exists") {
		t.Fatalf("export over an existing file: exit %d %q", r.code, r.stderr)
	}

	c.jsonRun(ExitOK, "create", "volume", "copy", "--size", "64MiB")
	c.jsonRun(ExitOK, "import", full, "copy")
	c.jsonRun(ExitOK, "import", incr, "copy")
	s2 := open("vol", client.Options{Snapshot: "s2"})
	cp := open("copy", client.Options{ReadOnly: true})
	if !bytes.Equal(image(cp), image(s2)) {
		t.Fatal("the imported volume differs from snapshot s2")
	}

	// A damaged export, one cut short and one with data after its end are
	// refused.
	b, err := os.ReadFile(incr)
	if err != nil {
		t.Fatal(err)
	}
	for name, bad := range map[string][]byte{
		"damaged":   func() []byte { d := bytes.Clone(b); d[len(d)/2] ^= 1; return d }(),
		"cut short": b[:len(b)-10],
		"trailing":  append(bytes.Clone(b), 'x'),
	} {
		path := filepath.Join(dir, "bad.img")
		if err := os.WriteFile(path, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		if r := c.run("import", path, "copy"); r.code != ExitError || !strings.Contains(r.stderr, "not a valid Cairn export") {
			t.Fatalf("import of a %s export: exit %d %q", name, r.code, r.stderr)
		}
	}
	// Through standard output: the image alone on stdout, the summary on
	// stderr.
	r := c.run("export", "vol@s1", "-")
	if r.code != ExitOK || !strings.Contains(r.stderr, "exported vol@s1") {
		t.Fatalf("export to stdout: exit %d %q", r.code, r.stderr)
	}
	piped := filepath.Join(dir, "piped.img")
	if err := os.WriteFile(piped, []byte(r.stdout), 0o644); err != nil {
		t.Fatal(err)
	}
	c.jsonRun(ExitOK, "create", "volume", "copy2", "--size", "64MiB")
	c.jsonRun(ExitOK, "import", piped, "copy2")
	s1 := open("vol", client.Options{Snapshot: "s1"})
	cp2 := open("copy2", client.Options{ReadOnly: true})
	if !bytes.Equal(image(cp2), image(s1)) {
		t.Fatal("the volume imported from standard output differs from snapshot s1")
	}

	// Rollback, refused while the writer has the volume open.
	if r := c.run("rollback", "vol", "s1"); r.code == ExitOK || !strings.Contains(r.stderr, "open for writing") {
		t.Fatalf("rollback under a writer: exit %d %q", r.code, r.stderr)
	}
	w.Close()
	m = c.jsonRun(ExitOK, "rollback", "vol", "s1")
	if jnum(t, m, "changed_bytes") != 2<<20 {
		t.Fatalf("rollback: %v", m)
	}
	back := open("vol", client.Options{ReadOnly: true})
	if !bytes.Equal(image(back), image(s1)) {
		t.Fatal("the volume after rollback differs from snapshot s1")
	}

	// check consistency compares what the snapshots read too: a page a
	// version keeps, damaged on one replica, is found.
	if m := c.jsonRun(ExitOK, "check", "consistency", "vol"); jnum(t, m, "snapshots") != 2 || jnum(t, m, "consistent") != jnum(t, m, "chunks") {
		t.Fatalf("check consistency with two snapshots: %v", m)
	}
	segs, err := c.Conn.Volumes().ListSegments(ctx, &mdspb.ListSegmentsRequest{Name: "vol"})
	if err != nil {
		t.Fatal(err)
	}
	kept := c.chunkFile(0, segs.Segments[0].Chunks[1]) + "_snap_1" // chunk 1 was rewritten under s1
	f, err := os.OpenFile(kept, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("damage"), 4096+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if m := c.jsonRun(ExitInconsistent, "check", "consistency", "vol"); jnum(t, m, "mismatched") != 1 {
		t.Fatalf("check consistency with a damaged kept page: %v", m)
	}
	for _, v := range []*client.Volume{s1, s2, cp, cp2, back} {
		v.Close()
	}
}
