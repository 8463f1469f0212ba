package ops

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/cluster"
)

// TestShrinkVolume: extend volume --allow-shrink shrinks a volume (refused
// without the flag, and while a client writes it); once the space beyond is
// given back it grows again, and what was written beyond reads as zeros.
func TestShrinkVolume(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster of three chunkservers")
	}
	c := &liveCluster{Cluster: cluster.Start(t, cluster.Options{}), t: t}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "128MiB")
	w, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "vol", client.Options{Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xab}, 1<<20)
	if _, err := w.WriteAt(ctx, data, 100<<20); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"extend", "volume", "vol", "--size", "64MiB"}, ExitUsage, "--allow-shrink"},
		{[]string{"extend", "volume", "vol", "--size", "64MiB", "--allow-shrink"}, ExitError, "open for writing"},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	m := c.jsonRun(ExitOK, "extend", "volume", "vol", "--size", "64MiB", "--allow-shrink")
	if jnum(t, m, "volume.size") != 64<<20 || !strings.HasPrefix(jstr(t, m, "action"), "shrunk") {
		t.Fatalf("shrink: %v", m)
	}
	soon.Succeeds(t, time.Minute, func() error {
		if r := c.run("extend", "volume", "vol", "--size", "128MiB"); r.code != ExitOK {
			return fmt.Errorf("grow after the shrink: exit %d, %s", r.code, r.stderr)
		}
		return nil
	})
	v, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "vol", client.Options{ReadOnly: true, Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	got := make([]byte, len(data))
	if _, err := v.ReadAt(ctx, got, 100<<20); err != nil || !bytes.Equal(got, make([]byte, len(data))) {
		t.Fatalf("what was written beyond the shrink reads back (%v)", err)
	}
}

// TestTrashCommands: trash volume frees the name and keeps the data; list
// trash shows it; restore volume brings it back byte for byte (under
// another name when the old one was taken); delete trash asks for the name
// and deletes it.
func TestTrashCommands(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster of three chunkservers")
	}
	c := &liveCluster{Cluster: cluster.Start(t, cluster.Options{}), t: t}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "64MiB")
	w, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "vol", client.Options{Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x5a}, 1<<20)
	if _, err := w.WriteAt(ctx, data, 3<<20); err != nil {
		t.Fatal(err)
	}
	if r := c.run("trash", "volume", "vol"); r.code != ExitError || !strings.Contains(r.stderr, "open for writing") {
		t.Fatalf("trash a volume open for writing: exit %d, %q", r.code, r.stderr)
	}
	_ = w.Close()
	m := c.jsonRun(ExitOK, "trash", "volume", "vol", "--expires", "1h")
	id := jnum(t, m, "volume.id")
	m = c.jsonRun(ExitOK, "list", "trash")
	if jlen(t, m, "trash") != 1 || jnum(t, m, "trash.0.id") != id || jstr(t, m, "trash.0.name") != "vol" {
		t.Fatalf("list trash: %v", m)
	}
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "64MiB") // the name is free
	if r := c.run("restore", "volume", fmt.Sprint(id)); r.code != ExitError || !strings.Contains(r.stderr, "exists") {
		t.Fatalf("restore under a taken name: exit %d, %q", r.code, r.stderr)
	}
	m = c.jsonRun(ExitOK, "restore", "volume", fmt.Sprint(id), "--name", "vol-back")
	if jstr(t, m, "volume.name") != "vol-back" {
		t.Fatalf("restore: %v", m)
	}
	v, err := client.OpenWithOptions(ctx, []string{c.MDS.Addr()}, "vol-back", client.Options{ReadOnly: true, Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	_, err = v.ReadAt(ctx, got, 3<<20)
	_ = v.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the restored volume does not read what was written (%v)", err)
	}
	m = c.jsonRun(ExitOK, "trash", "volume", "vol-back")
	id = jnum(t, m, "volume.id")
	if r := runOps(t, "nope\n", "--mds", c.MDS.Addr(), "delete", "trash", fmt.Sprint(id)); r.code != ExitError || !strings.Contains(r.stderr, "not confirmed") {
		t.Fatalf("delete trash, wrong confirmation: exit %d, %q", r.code, r.stderr)
	}
	if r := runOps(t, "vol-back\n", "--mds", c.MDS.Addr(), "delete", "trash", fmt.Sprint(id)); r.code != ExitOK {
		t.Fatalf("delete trash: exit %d, %q", r.code, r.stderr)
	}
	if m := c.jsonRun(ExitOK, "list", "trash"); jlen(t, m, "trash") != 0 {
		t.Fatalf("list trash after the delete: %v", m)
	}
}
