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
