package ops

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
)

// runOnTerminal runs cairn-ops against the cluster with stderr on a
// pseudo-terminal, and returns what reached stdout and the terminal.
func (c *doubleCluster) runOnTerminal(t *testing.T, args ...string) (stdout, tty string, code int) {
	t.Helper()
	master, slave := openPTY(t)
	var buf bytes.Buffer
	read := make(chan struct{})
	go func() {
		defer close(read)
		_, _ = io.Copy(&buf, master) // ends with EIO once the slave is closed
	}()
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code = RunWithInput(ctx, append([]string{"--insecure", "--mds", c.mds.Addr(), "--timeout", "10s"}, args...), strings.NewReader(""), &out, slave)
	_ = slave.Close()
	<-read
	return out.String(), buf.String(), code
}

// TestWaitProgress: the waiting commands show on a terminal what they wait
// for, with the MDS's figures where it has them: create pool --wait the
// copysets with a leader and the chunk files formatted, delete volume --wait
// the segments freed; delete snapshot --wait, which has no figures, says so.
// Nothing of it reaches stdout.
func TestWaitProgress(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.css[1].SetFailing(true)
	if r := c.run("create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", "4"); r.code != ExitError {
		t.Fatalf("create pool with a failing chunkserver: exit %d, %s", r.code, r.stderr)
	}
	// The first double leads the copysets it created while the second
	// fails: a majority of each created it.
	for _, spec := range c.css[0].Copysets() {
		c.css[0].SetLeading(spec.Copyset, true, 1)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		for _, cs := range c.copysets() {
			if cs.LeaderId == 0 {
				return fmt.Errorf("copyset %s has no leader yet", cs.Id.Name())
			}
		}
		return nil
	})
	time.AfterFunc(time.Second, func() { c.css[1].SetFailing(false) })
	stdout, tty, code := c.runOnTerminal(t, "create", "pool", "lp0", "--physical-pool", "pool0", "--copysets-per-chunkserver", "4", "--wait", "30s")
	if code != ExitOK || !strings.HasPrefix(stdout, `logical pool "lp0"`) {
		t.Fatalf("create pool --wait: exit %d, stdout %q, terminal %q", code, stdout, tty)
	}
	if !strings.Contains(tty, "pool lp0: copysets with a leader (chunk files formatted: 3000 of 3000)") || !strings.Contains(tty, "(4/4)") {
		t.Errorf("create pool --wait shows no figures: %q", tty)
	}
	c.leadAll(0)

	c.mustRun("create", "volume", "vol", "--size", "24MiB")
	for _, off := range []uint64{0, 8 << 20, 16 << 20} {
		if _, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol", Offset: off, Allocate: true}); err != nil {
			t.Fatal(err)
		}
	}
	stdout, tty, code = c.runOnTerminal(t, "delete", "volume", "vol", "--yes", "--wait", "30s")
	if code != ExitOK || stdout != "volume \"vol\" (id 1) deleted and its chunks freed\n" {
		t.Fatalf("delete volume --wait: exit %d, stdout %q, terminal %q", code, stdout, tty)
	}
	if !strings.Contains(tty, "freeing volume vol: segments") || !strings.Contains(tty, "3/3") {
		t.Errorf("delete volume --wait shows no segments freed: %q", tty)
	}

	// The doubles trim no chunk: the snapshot's space is never given back.
	c.mustRun("create", "volume", "vol2", "--size", "8MiB")
	c.mustRun("create", "snapshot", "vol2", "s1")
	stdout, tty, code = c.runOnTerminal(t, "delete", "snapshot", "vol2", "s1", "--yes", "--wait", "1s")
	if code != ExitError || stdout != "" {
		t.Fatalf("delete snapshot --wait: exit %d, stdout %q, terminal %q", code, stdout, tty)
	}
	for _, want := range []string{
		"giving back the space of snapshot vol2@s1, deleted ",
		"(it gives no count of chunks trimmed)",
		`cairn-ops: snapshot "s1" of volume "vol2" is deleted, but its space is not all given back after 1s; the MDS goes on`,
	} {
		if !strings.Contains(tty, want) {
			t.Errorf("delete snapshot --wait: the terminal does not say %q: %q", want, tty)
		}
	}
}

// TestPoolProgress counts a pool's copysets with a leader and the chunk
// files of its physical pool's chunkservers only, retired ones left out.
func TestPoolProgress(t *testing.T) {
	lp := &mdspb.LogicalPool{Name: "lp0", PhysicalPoolId: 1}
	topo := &topology{
		zones: []*mdspb.Zone{{Id: 1, PhysicalPoolId: 1}, {Id: 2, PhysicalPoolId: 1}, {Id: 3, PhysicalPoolId: 2}},
		chunkservers: []*mdspb.ChunkServer{
			{Id: 1, ZoneId: 1, Capacity: &mdspb.Capacity{PoolFreeChunks: 90, PoolUsedChunks: 10, PoolTargetChunks: 400}},
			{Id: 2, ZoneId: 2, Capacity: &mdspb.Capacity{PoolFreeChunks: 300, PoolUsedChunks: 0, PoolTargetChunks: 200}},
			{Id: 3, ZoneId: 3, Capacity: &mdspb.Capacity{PoolFreeChunks: 7, PoolTargetChunks: 1000}},
			{Id: 4, ZoneId: 1, RwState: mdspb.RWState_RW_STATE_RETIRED, Capacity: &mdspb.Capacity{PoolTargetChunks: 1000}},
		},
	}
	copysets := []*mdspb.Copyset{{LeaderId: 1}, {}, {LeaderId: 2}}
	p := poolProgress(lp, copysets, topo)
	if p.done != 2 || p.total != 3 || p.desc != "pool lp0: copysets with a leader (chunk files formatted: 400 of 700)" {
		t.Errorf("progress %+v", p)
	}
}
