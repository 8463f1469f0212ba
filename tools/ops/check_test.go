package ops

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/api/mdspb"
)

// volumeWithData creates volume "vol" of three segments, allocates two of
// them and writes random data into some of their chunks on every replica.
// It returns the allocated segments.
func (c *replicaCluster) volumeWithData(written map[int]bool) []*mdspb.Segment {
	c.t.Helper()
	c.mustRun("create", "volume", "vol", "--size", "24MiB")
	var segs []*mdspb.Segment
	for _, off := range []uint64{0, 16 << 20} {
		resp, err := c.conn.Volumes().GetSegment(c.ctx, &mdspb.GetSegmentRequest{Name: "vol", Offset: off, Allocate: true})
		if err != nil {
			c.t.Fatal(err)
		}
		segs = append(segs, resp.Segment)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	i := 0
	for _, s := range segs {
		for _, ch := range s.Chunks {
			if written[i] {
				data := make([]byte, 64<<10)
				for j := range data {
					data[j] = byte(rng.Uint32())
				}
				c.writeAll(ch.Copyset, ch.ChunkId, int64(i%4)*(128<<10), data)
			}
			i++
		}
	}
	return segs
}

func TestCheckConsistency(t *testing.T) {
	c := newReplicaCluster(t, 2)
	segs := c.volumeWithData(map[int]bool{0: true, 1: true, 5: true, 9: true, 15: true})

	m := c.jsonRun(ExitOK, "check", "consistency", "vol")
	for path, want := range map[string]uint64{"chunks": 16, "segments": 2, "consistent": 16, "mismatched": 0, "unverified": 0} {
		if got := jnum(t, m, path); got != want {
			t.Errorf("%s = %d, want %d", path, got, want)
		}
	}
	if jlen(t, m, "problems") != 0 || jstr(t, m, "volume") != "vol" {
		t.Errorf("report %v", m)
	}
	golden(t, "check_consistency_ok", c.normalize(c.mustRun("check", "consistency", "vol").stdout, nil))

	// Plant a corruption straight into one replica's chunk file.
	bad := segs[1].Chunks[1] // chunk 9 of the volume: written
	victim := c.replica(c.replicas[1].id())
	corrupt(t, victim.chunkPath(bad.Copyset, bad.ChunkId), 4096, []byte("not what was written"))

	m = c.jsonRun(ExitInconsistent, "check", "consistency", "vol")
	if jnum(t, m, "mismatched") != 1 || jnum(t, m, "consistent") != 15 || jlen(t, m, "problems") != 1 {
		t.Fatalf("report %v", m)
	}
	p := "problems.0"
	if jnum(t, m, p+".chunk_id") != bad.ChunkId || jstr(t, m, p+".status") != "mismatch" ||
		jstr(t, m, p+".copyset") != bad.Copyset.Name() || jnum(t, m, p+".volume_offset") != 16<<20+1<<20 {
		t.Errorf("problem %v", jget(t, m, p))
	}
	var differs []uint64
	crcs := map[uint64]bool{}
	for i := range jlen(t, m, p+".replicas") {
		r := fmt.Sprintf("%s.replicas.%d", p, i)
		if jbool(t, m, r+".differs") {
			differs = append(differs, jnum(t, m, r+".chunkserver_id"))
		}
		crcs[jnum(t, m, r+".crc32c")] = true
		if !jbool(t, m, r+".exists") {
			t.Errorf("%s does not exist", r)
		}
	}
	if !slices.Equal(differs, []uint64{victim.id()}) || len(crcs) != 2 {
		t.Errorf("replicas marked as differing: %v (crcs %v), want [%d]", differs, crcs, victim.id())
	}
	if want := fmt.Sprintf("chunkserver %d (%s) has crc32c", victim.id(), victim.addr); !strings.Contains(jstr(t, m, p+".problem"), want) {
		t.Errorf("problem %q does not say %q", jstr(t, m, p+".problem"), want)
	}
	r := c.run("check", "consistency", "vol")
	if r.code != ExitInconsistent {
		t.Fatalf("exit %d, want %d", r.code, ExitInconsistent)
	}
	// CRCs depend on the planted bytes only, and the copyset of a chunk on
	// the MDS's order of copysets.
	table := regexp.MustCompile(`crc32c [0-9a-f]{8}`).ReplaceAllString(c.normalize(r.stdout, nil), "crc32c xxxxxxxx")
	table = regexp.MustCompile(`have [0-9a-f]{8}`).ReplaceAllString(table, "have xxxxxxxx")
	table = regexp.MustCompile(`(?m)^(\d+\s+)\d+:\d+`).ReplaceAllString(table, "${1}P:C")
	golden(t, "check_consistency_mismatch", table)
}

// TestCheckConsistencyZeroChunkMissingOnOneReplica: a chunk that exists on
// two replicas with zeros and not at all on the third reads the same
// everywhere (a missing chunk reads as zeros): consistent.
func TestCheckConsistencyZeroChunkMissingOnOneReplica(t *testing.T) {
	c := newReplicaCluster(t, 1)
	segs := c.volumeWithData(nil)
	ch := segs[0].Chunks[2]
	for _, d := range c.replicas[:2] {
		if err := d.copyset(ch.Copyset).store.WriteAt(ch.ChunkId, make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
	}
	m := c.jsonRun(ExitOK, "check", "consistency", "vol")
	if jnum(t, m, "consistent") != 16 {
		t.Errorf("report %v", m)
	}
	// The same chunk with data on two replicas only differs.
	for _, d := range c.replicas[:2] {
		if err := d.copyset(ch.Copyset).store.WriteAt(ch.ChunkId, bytes.Repeat([]byte{7}, 4096), 0); err != nil {
			t.Fatal(err)
		}
	}
	m = c.jsonRun(ExitInconsistent, "check", "consistency", "vol")
	if jnum(t, m, "problems.0.chunk_id") != ch.ChunkId || !strings.Contains(jstr(t, m, "problems.0.problem"), fmt.Sprintf("chunkserver %d", c.replicas[2].id())) {
		t.Errorf("report %v", m)
	}
}

// TestCheckConsistencyUnverified: replicas whose applied indexes never meet
// and replicas that do not answer leave chunks unverified (exit 3), never
// reported consistent.
func TestCheckConsistencyUnverified(t *testing.T) {
	c := newReplicaCluster(t, 1)
	segs := c.volumeWithData(map[int]bool{0: true})
	ch := segs[0].Chunks[0]
	lagging := c.replicas[2]
	lagging.setApplied(ch.Copyset, 0)

	m := c.jsonRun(ExitUnhealthy, "check", "consistency", "vol", "--retries", "2", "--retry-interval", "10ms")
	// One copyset holds every chunk here: all are unverified.
	if jnum(t, m, "unverified") != 16 || jnum(t, m, "consistent") != 0 || jnum(t, m, "mismatched") != 0 {
		t.Fatalf("report %v", m)
	}
	want := fmt.Sprintf("replicas are at different applied indexes: chunkserver %d at 1, chunkserver %d at 1, chunkserver %d at 0 after 3 tries",
		c.replicas[0].id(), c.replicas[1].id(), lagging.id())
	if got := jstr(t, m, "problems.0.problem"); !strings.HasPrefix(got, want) || jstr(t, m, "problems.0.status") != "unverified" {
		t.Errorf("problem %q, want %q", got, want)
	}

	// The follower catches up while the check waits: consistent.
	lagging.setApplied(ch.Copyset, 1)
	c.jsonRun(ExitOK, "check", "consistency", "vol", "--retries", "2", "--retry-interval", "10ms")

	lagging.stop()
	m = c.jsonRun(ExitUnhealthy, "check", "consistency", "vol", "--retries", "1", "--retry-interval", "10ms", "--timeout", "2s")
	if jnum(t, m, "unverified") != 16 {
		t.Fatalf("report %v", m)
	}
	if got := jstr(t, m, "problems.0.problem"); !strings.Contains(got, fmt.Sprintf("chunkserver %d (%s): get chunk info:", lagging.id(), lagging.addr)) {
		t.Errorf("problem %q does not name the unreachable replica", got)
	}

	if r := c.run("check", "consistency", "nope"); r.code != ExitNotFound {
		t.Errorf("unknown volume: exit %d", r.code)
	}
}

func TestCheckCopyset(t *testing.T) {
	c := newReplicaCluster(t, 2)
	// Three writes into copyset 1:1 (two chunks), one into 1:2.
	c.writeAll(ref(1, 1), 100, 0, bytes.Repeat([]byte{1}, 4096))
	c.writeAll(ref(1, 1), 100, 4096, bytes.Repeat([]byte{2}, 4096))
	c.writeAll(ref(1, 1), 101, 0, bytes.Repeat([]byte{3}, 4096))
	c.writeAll(ref(1, 2), 102, 0, bytes.Repeat([]byte{4}, 4096))

	m := c.jsonRun(ExitOK, "check", "copyset")
	if !jbool(t, m, "healthy") || jnum(t, m, "total") != 2 || jnum(t, m, "unhealthy") != 0 {
		t.Fatalf("report %v", m)
	}
	golden(t, "check_copyset_all_ok", c.normalize(c.mustRun("check", "copyset").stdout, nil))

	cs := c.copysets()[0]
	m = c.jsonRun(ExitOK, "check", "copyset", cs.Id.Name())
	golden(t, "check_copyset_one_ok", c.normalize(c.mustRun("check", "copyset", "1").stdout, nil))
	// --copyset names it as update leader's does, in either notation.
	for _, args := range [][]string{{"--copyset", "1:1"}, {"--copyset", "lp0:1"}, {"1:1", "--copyset", "1:1"}, {"--copyset", "1", "--pool", "lp0"}} {
		golden(t, "check_copyset_one_ok", c.normalize(c.mustRun(append([]string{"check", "copyset"}, args...)...).stdout, nil))
	}
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"1:1", "--copyset", "1:2"}, ExitUsage, "copyset 1:1 given twice, as 1:1 and --copyset 1:2"},
		{[]string{"--copyset", "1-1"}, ExitUsage, `copyset id "1-1": want POOL:COPYSET (for example 1:7) or COPYSET`},
		{[]string{"--copyset", "1", "--pool", "nope"}, ExitNotFound, `logical pool "nope" does not exist`},
		{[]string{"--copyset", "1:99"}, ExitNotFound, "copyset 1:99 does not exist"},
	} {
		if r := c.run(append([]string{"check", "copyset"}, tc.args...)...); r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("check copyset %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
	if jnum(t, m, "total") != 1 || jstr(t, m, "copysets.0.copyset") != cs.Id.Name() || jnum(t, m, "copysets.0.leader_id") != cs.LeaderId {
		t.Fatalf("report %v", m)
	}
	for i, d := range c.replicas {
		r := fmt.Sprintf("copysets.0.replicas.%d", i)
		wantRole := "follower"
		if d.id() == cs.LeaderId {
			wantRole = "leader"
		}
		if jnum(t, m, r+".chunkserver_id") != d.id() || !jbool(t, m, r+".reachable") || !jbool(t, m, r+".hosted") ||
			jstr(t, m, r+".role") != wantRole || jlen(t, m, r+".peers") != 3 {
			t.Errorf("%s = %v", r, jget(t, m, r))
		}
	}

	// A replica far behind, one installing a snapshot.
	c.replicas[1].setApplied(cs.Id, 5000)
	c.replicas[2].setInstalling(cs.Id, true)
	m = c.jsonRun(ExitUnhealthy, "check", "copyset", cs.Id.Name())
	reasons := jstrings(t, m, "copysets.0.reasons")
	slices.Sort(reasons)
	if !slices.Equal(reasons, []string{reasonInstallingSnapshot, reasonLogGap}) {
		t.Errorf("reasons %v (%v)", reasons, jget(t, m, "copysets.0.problems"))
	}
	if gap := jnum(t, m, "copysets.0.applied_index_gap"); gap < 4990 {
		t.Errorf("applied_index_gap %d", gap)
	}
	c.replicas[2].setInstalling(cs.Id, false)
	c.jsonRun(ExitOK, "check", "copyset", cs.Id.Name(), "--max-log-gap", "10000", "--pool", "lp0")
	c.replicas[1].setApplied(cs.Id, c.replicas[0].copyset(cs.Id).applied)

	// A replica that stops answering.
	c.replicas[2].stop()
	r := c.run("--timeout", "2s", "check", "copyset", cs.Id.Name())
	if r.code != ExitUnhealthy {
		t.Fatalf("exit %d, want %d\n%s%s", r.code, ExitUnhealthy, r.stdout, r.stderr)
	}
	want := fmt.Sprintf("chunkserver %d (%s) did not answer", c.replicas[2].id(), c.replicas[2].addr)
	if !strings.Contains(r.stdout, want) {
		t.Errorf("output does not say %q:\n%s", want, r.stdout)
	}
	// The transport's words for a refused connection are not ours to fix.
	table := regexp.MustCompile(`did not answer: .*`).ReplaceAllString(c.normalize(r.stdout, nil), "did not answer: ERROR")
	table = regexp.MustCompile(`get copyset status from \S+: .*`).ReplaceAllString(table, "ERROR")
	golden(t, "check_copyset_one_unreachable", table)
	m = c.jsonRun(ExitUnhealthy, "--timeout", "2s", "check", "copyset")
	if jnum(t, m, "unhealthy") != 2 || !slices.Contains(jstrings(t, m, "copysets.1.reasons"), reasonReplicaUnreachable) {
		t.Errorf("report %v", m)
	}
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"check", "copyset", "1:99"}, ExitNotFound, "copyset 1:99 does not exist"},
		{[]string{"check", "copyset", "x:1"}, ExitNotFound, `logical pool "x" does not exist`},
		{[]string{"check", "copyset", "--pool", "nope"}, ExitNotFound, `logical pool "nope" does not exist`},
	} {
		r := c.run(tc.args...)
		if r.code != tc.code || !strings.Contains(r.stderr, tc.msg) {
			t.Errorf("cairn-ops %s: exit %d, stderr %q; want exit %d and %q", strings.Join(tc.args, " "), r.code, r.stderr, tc.code, tc.msg)
		}
	}
}

// openPTY opens a pseudo-terminal pair: what the slave is written, the
// master reads.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatalf("unlock pty: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatalf("pty number: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open pty slave: %v", err)
	}
	t.Cleanup(func() { _ = m.Close(); _ = s.Close() })
	return m, s
}

// TestCheckConsistencyProgressBar: with stderr on a terminal a progress bar
// runs there; the report on stdout is the same as without it (the other
// tests run with stderr in a buffer and see no bar).
func TestCheckConsistencyProgressBar(t *testing.T) {
	c := newReplicaCluster(t, 1)
	c.volumeWithData(map[int]bool{3: true})
	master, slave := openPTY(t)
	var tty bytes.Buffer
	read := make(chan struct{})
	go func() {
		defer close(read)
		_, _ = io.Copy(&tty, master) // ends with EIO once the slave is closed
	}()
	var stdout bytes.Buffer
	code := RunWithInput(context.Background(), []string{"--insecure", "--mds", c.mds.Addr(), "check", "consistency", "vol"}, strings.NewReader(""), &stdout, slave)
	_ = slave.Close()
	<-read
	if code != ExitOK {
		t.Fatalf("exit %d\n%s%s", code, stdout.String(), tty.String())
	}
	t.Logf("terminal: %q", tty.String())
	if !strings.Contains(tty.String(), "checking vol") || !strings.Contains(tty.String(), "16/16") {
		t.Errorf("no progress bar on the terminal: %q", tty.String())
	}
	if strings.Contains(stdout.String(), "checking vol") || !strings.Contains(stdout.String(), `volume "vol": CONSISTENT`) {
		t.Errorf("stdout: %q", stdout.String())
	}
	r := c.run("check", "consistency", "vol")
	if r.stderr != "" || r.stdout != stdout.String() {
		t.Errorf("without a terminal: stderr %q, stdout %q (with one: %q)", r.stderr, r.stdout, stdout.String())
	}
}
