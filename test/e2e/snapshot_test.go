package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/tools/playground"
)

// clone: a clone of vol0@snap1 (holding a) reads a over NBD at once; C
// written into it over NBD (qemu-io) reads back on top of a; flatten runs while the
// chunkserver leading the most copysets is killed with SIGKILL, completes,
// and once the source is released the clone reads C and a, and the
// snapshot may go.
func (e *env) clone(t *testing.T, ops func(args ...string) string, a []byte) {
	start := time.Now()
	ops("create", "volume", "cl", "--from", "vol0@snap1")
	t.Logf("clone of vol0@snap1 created in %v (cairn-ops run included)", time.Since(start).Round(time.Millisecond))
	defer ops("delete", "volume", "cl", "--yes", "--force") // the gateway keeps it open
	plain := strings.TrimSuffix(e.vol0.NBDURL, "vol0") + "cl"
	url := e.tls.NBDSURL(plain)
	back := e.path("cloneback")
	defer os.Remove(back)
	testtool.MustRun(t, 5*time.Minute, "nbdcopy", url, back)
	checkImage(t, back, a, int64(e.vol0.Size))
	os.Remove(back)

	// C: 512 bytes inside the first page (the clone reads the rest of
	// the page from the snapshot and writes it with them), and a whole
	// page.
	testtool.MustRun(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 85 1024 512", "-c", "write -P 171 4096 4096", plain)
	want := append([]byte(nil), a...)
	for i := 1024; i < 1536; i++ {
		want[i] = 85
	}
	for i := 4096; i < 8192; i++ {
		want[i] = 171
	}

	// Flatten while a chunkserver is killed.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	victim, _ := e.busiestChunkServer(t, ctx)
	old := *e.pg.state(t).Process(victim)
	st := e.pg.state(t)
	flatten := exec.CommandContext(ctx, filepath.Join(binDir, "cairn-ops"), append(opsArgs(st), "-o", "json", "flatten", "cl", "--wait", "2m")...)
	var out syncBuffer
	flatten.Stdout, flatten.Stderr = &out, &out
	if err := flatten.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if err := syscall.Kill(old.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed %s (pid %d) during the flatten", victim, old.PID)
	if err := flatten.Wait(); err != nil {
		t.Fatalf("flatten across the kill: %v\n%s", err, out.String())
	}
	var res struct {
		CopiedBytes int64   `json:"copied_bytes"`
		TookSeconds float64 `json:"took_seconds"`
		Released    bool    `json:"released"`
	}
	if err := json.Unmarshal([]byte(out.String()), &res); err != nil || !res.Released {
		t.Fatalf("flatten output %q: %v", out.String(), err)
	}
	t.Logf("flatten copied %d MiB in %.1f s across the kill", res.CopiedBytes>>20, res.TookSeconds)
	e.awaitRestart(t, ctx, victim, old)
	testtool.MustRun(t, 5*time.Minute, "nbdcopy", url, back)
	checkImage(t, back, want, int64(e.vol0.Size))
}

// snapshots: with vol0 holding A (the first copy), cairn-ops takes a
// snapshot; B is written over the first 64 MiB of vol0 while a chunkserver
// is killed with SIGKILL (and restarted). Read over NBD
// with TLS, vol0@snap1 gives A and vol0 gives B then the rest of A, byte
// for byte; the snapshot export refuses writes; deleting the snapshot
// gives its space back.
func (e *env) snapshots(t *testing.T) {
	testtool.Need(t, "nbdcopy", "iscsi-ls", "qemu-img", "qemu-io")
	if e.want == nil {
		t.Skip("no copy of vol0 to snapshot (an earlier step failed)")
	}
	st := e.pg.state(t)
	ops := func(args ...string) string {
		t.Helper()
		return testtool.MustRun(t, 3*time.Minute, filepath.Join(binDir, "cairn-ops"), append(opsArgs(st), args...)...)
	}
	var taken struct {
		Snapshot struct {
			Name string `json:"name"`
			Seq  uint64 `json:"seq"`
		} `json:"snapshot"`
		TookSeconds float64 `json:"took_seconds"`
	}
	if err := json.Unmarshal([]byte(ops("-o", "json", "create", "snapshot", "vol0", "snap1")), &taken); err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot of the 10 GiB vol0 with %d MiB written taken in %.0f ms", copySize>>20, taken.TookSeconds*1000)
	a := e.want

	// B goes in through copies on write, and a chunkserver is killed with
	// SIGKILL in the middle of them.
	const bSize = 64 << 20
	src := e.path("b")
	b := testtool.RandomFile(t, src, bSize)
	e.copyThroughKill(t, src, bSize)
	os.Remove(src)
	now := append(append([]byte(nil), b...), a[bSize:]...)

	snapURL := e.tls.NBDSURL(e.vol0.NBDURL + "@snap1")
	back := e.path("snapback")
	defer os.Remove(back)
	testtool.MustRun(t, 5*time.Minute, "nbdcopy", snapURL, back)
	checkImage(t, back, a, int64(e.vol0.Size))
	os.Remove(back)
	e.want = now
	e.readBackFrom(t, e.tls.NBDSURL(e.vol0.NBDURL))

	// The snapshot is read-only.
	small := e.path("small")
	testtool.RandomFile(t, small, 1<<20)
	defer os.Remove(small)
	if out, err := testtool.Run(t, time.Minute, "nbdcopy", small, snapURL); err == nil {
		t.Fatalf("nbdcopy wrote to a snapshot export:\n%s", out)
	} else if !strings.Contains(strings.ToLower(out), "read") {
		t.Logf("write to the snapshot refused: %s", out)
	}

	// Over iSCSI, as target <prefix>:vol0:snap:snap1 (an "@" would end the
	// user name in an iSCSI URL).
	portal := "iscsi://" + st.ISCSI
	iqn := playground.IQNPrefix + ":vol0:snap:snap1"
	if out := testtool.MustRun(t, time.Minute, "iscsi-ls", "-s", portal); !strings.Contains(out, iqn) {
		t.Fatalf("iscsi-ls does not list the snapshot's target %s:\n%s", iqn, out)
	}
	if out := testtool.MustRun(t, time.Minute, "qemu-img", "info", "-f", "raw", portal+"/"+iqn+"/0"); !strings.Contains(out, "10 GiB") {
		t.Fatalf("qemu-img info of the snapshot's target:\n%s", out)
	}
	if out := ops("list", "snapshot", "vol0"); !strings.Contains(out, "snap1") {
		t.Fatalf("list snapshot:\n%s", out)
	}
	e.clone(t, ops, a)
	ops("delete", "snapshot", "vol0", "snap1", "--yes", "--wait", "2m")
	if out := ops("list", "snapshot", "vol0"); strings.Contains(out, "snap1") {
		t.Fatalf("list snapshot after the delete:\n%s", out)
	}
	e.readBackFrom(t, e.tls.NBDSURL(e.vol0.NBDURL))
}
