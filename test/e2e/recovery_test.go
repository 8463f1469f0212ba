package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/tools/playground"
)

// TestPlaygroundRecovers loses a disk: a playground with two chunkservers
// per zone holds data; one chunkserver's data directory is deleted and the
// process killed with SIGKILL, while another volume is being written over
// and over. The playground restarts it on the empty directory (a new
// chunkserver; the old one is retired), the MDS rebuilds every replica the
// lost disk held, and then: cairn-ops status is healthy, every copyset has
// three replicas in three zones, check consistency passes, and both
// volumes read back byte for byte. The MDS is killed half way through the
// rebuild; the restarted one finishes it.
func TestPlaygroundRecovers(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test: builds the binaries and runs a multi-process cluster")
	}
	testtool.Need(t, "nbdcopy")
	dir := t.TempDir()
	base, err := playground.FindFreeBase(os.Getpid() + 7)
	if err != nil {
		t.Fatal(err)
	}
	pg := startPlayground(t, dir, base, "--chunkservers-per-zone", "2", "--copysets-per-chunkserver", "20",
		"--volume-size", "1GiB")
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(pg.logTails())
		}
		pg.stop(t)
	})
	st := pg.state(t)
	conn := dialMDS(t, st)
	work := t.TempDir()
	ops := func(timeout time.Duration, args ...string) (string, error) {
		return testtool.Run(t, timeout, filepath.Join(binDir, "cairn-ops"), append(opsArgs(st), args...)...)
	}

	// Data on vol0.
	const size = 128 << 20
	src := filepath.Join(work, "vol0.img")
	want := testtool.RandomFile(t, src, size)
	testtool.MustRun(t, 5*time.Minute, "nbdcopy", src, st.Volume.NBDURL)

	// Writes to vol1 all along: each round copies another image.
	if out, err := ops(time.Minute, "create", "volume", "vol1", "--size", "64MiB"); err != nil {
		t.Fatalf("create vol1: %v\n%s", err, out)
	}
	vol1 := strings.TrimSuffix(st.Volume.NBDURL, "/"+st.Volume.Name) + "/vol1"
	bg := startCopies(t, work, vol1, 16<<20)

	// Lose cs0's disk.
	victim := *st.Process("cs0")
	oldID := chunkServerAt(t, conn, victim.Addr)
	// Move the directory away in one step (the running chunkserver keeps
	// formatting pool files into it, so removing it in place races), then
	// kill the process and remove what it left.
	lost := victim.DataDir + ".lost"
	if err := os.Rename(victim.DataDir, lost); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error { return os.RemoveAll(lost) })
	start := time.Now()
	t.Logf("deleted %s and killed cs0 (chunkserver %d)", victim.DataDir, oldID)

	// Half way through, the MDS dies; the one the playground restarts
	// finds the operators in etcd and finishes the rebuild.
	soon.Succeeds(t, 5*time.Minute, func() error {
		st, err := conn.Cluster().GetScheduleStatus(context.Background(), &mdspb.GetScheduleStatusRequest{})
		if err != nil {
			return err
		}
		if st.CopysetsToRepair == 0 || st.CopysetsToRepair > 12 {
			return fmt.Errorf("%d copysets to repair", st.CopysetsToRepair)
		}
		return nil
	})
	mdsProc := *pg.state(t).Process("mds")
	if err := syscall.Kill(mdsProc.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed the MDS (pid %d) with the rebuild half done", mdsProc.PID)

	var whole time.Duration
	soon.Succeeds(t, 5*time.Minute, func() error {
		if err := wholeCopysets(conn, oldID); err != nil {
			return err
		}
		if whole == 0 {
			whole = time.Since(start)
		}
		if out, err := ops(time.Minute, "status"); err != nil {
			return fmt.Errorf("status: %v\n%s", err, out)
		}
		return nil
	})
	took := time.Since(start)
	t.Logf("every copyset whole after %v", whole.Round(100*time.Millisecond))
	rounds, last := bg.stop(t)
	t.Logf("recovered in %v; %d copies to vol1 completed meanwhile", took.Round(100*time.Millisecond), rounds)
	if rounds < 2 {
		t.Fatalf("only %d copies to vol1 completed during the recovery", rounds)
	}
	if out, err := ops(5*time.Minute, "check", "consistency", st.Volume.Name); err != nil {
		t.Fatalf("check consistency: %v\n%s", err, out)
	}
	if out, err := ops(5*time.Minute, "check", "consistency", "vol1"); err != nil {
		t.Fatalf("check consistency vol1: %v\n%s", err, out)
	}
	back := filepath.Join(work, "back")
	testtool.MustRun(t, 5*time.Minute, "nbdcopy", st.Volume.NBDURL, back)
	checkImage(t, back, want, int64(st.Volume.Size))
	v1, err := conn.Volumes().StatVolume(context.Background(), &mdspb.StatVolumeRequest{Name: "vol1"})
	if err != nil {
		t.Fatal(err)
	}
	testtool.MustRun(t, 5*time.Minute, "nbdcopy", vol1, back)
	checkImage(t, back, last, int64(v1.Volume.Size))
	// Every metric the Grafana dashboard queries is served (the schedulers'
	// counters exist once they ran).
	checkDashboardMetrics(t, pg.state(t))
	// The lost chunkserver is retired and, holding nothing, can be deleted.
	if out, err := ops(time.Minute, "delete", "chunkserver", fmt.Sprint(oldID)); err != nil {
		t.Fatalf("delete the lost chunkserver: %v\n%s", err, out)
	}
}

// chunkServerAt is the id of the chunkserver the MDS knows at addr.
func chunkServerAt(t *testing.T, conn *mdsclient.Conn, addr string) uint64 {
	t.Helper()
	resp, err := conn.Topology().ListChunkServers(context.Background(), &mdspb.ListChunkServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, cs := range resp.Chunkservers {
		if cs.Address == addr && cs.RwState == mdspb.RWState_RW_STATE_READWRITE {
			return cs.Id
		}
	}
	t.Fatalf("no chunkserver at %s", addr)
	return 0
}

// wholeCopysets checks that every copyset has three voters in three zones,
// none on gone, and that no operator is left.
func wholeCopysets(conn *mdsclient.Conn, gone uint64) error {
	ctx := context.Background()
	css, err := conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return err
	}
	zone := map[uint64]uint32{}
	for _, cs := range css.Chunkservers {
		zone[cs.Id] = cs.ZoneId
	}
	list, err := conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{})
	if err != nil {
		return err
	}
	for _, c := range list.Copysets {
		zones := map[uint32]bool{}
		for _, p := range c.Peers {
			if p.ChunkserverId == gone {
				return fmt.Errorf("copyset %s still has a replica on the lost chunkserver", c.Id.Name())
			}
			zones[zone[p.ChunkserverId]] = true
		}
		if len(c.Peers) != 3 || len(zones) != 3 {
			return fmt.Errorf("copyset %s: %d voters in %d zones", c.Id.Name(), len(c.Peers), len(zones))
		}
	}
	ops, err := conn.Cluster().ListOperators(ctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		return err
	}
	if len(ops.Operators) > 0 {
		return fmt.Errorf("%d operators still pending", len(ops.Operators))
	}
	return nil
}

// copies writes images of n random bytes to an NBD URL, one after the
// other, until stopped.
type copies struct {
	halt chan struct{}
	done chan struct{}

	mu     sync.Mutex
	rounds int
	last   []byte // the image of the last copy that completed
	err    error
}

func startCopies(t *testing.T, work, url string, n int) *copies {
	t.Helper()
	c := &copies{halt: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for i := 0; ; i++ {
			select {
			case <-c.halt:
				return
			default:
			}
			path := filepath.Join(work, fmt.Sprintf("copy%d", i%2))
			img := make([]byte, n)
			_, _ = rand.Read(img)
			if err := os.WriteFile(path, img, 0o600); err != nil {
				c.mu.Lock()
				c.err = err
				c.mu.Unlock()
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			out, err := exec.CommandContext(ctx, "nbdcopy", path, url).CombinedOutput()
			cancel()
			c.mu.Lock()
			if err != nil {
				c.err = fmt.Errorf("nbdcopy round %d: %v: %s", i, err, bytes.TrimSpace(out))
				c.mu.Unlock()
				return
			}
			c.rounds++
			c.last = img
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		select {
		case <-c.halt:
		default:
			close(c.halt)
		}
		<-c.done
	})
	return c
}

// stop waits for the copy under way and returns the rounds completed and
// the last image written.
func (c *copies) stop(t *testing.T) (int, []byte) {
	t.Helper()
	close(c.halt)
	<-c.done
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		t.Fatal(c.err)
	}
	return c.rounds, c.last
}

// checkDashboardMetrics fails unless every metric the Grafana dashboard's
// queries name is served by one of the playground's processes.
func checkDashboardMetrics(t *testing.T, st *playground.State) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "deploy", "grafana", "cairn.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatalf("deploy/grafana/cairn.json: %v", err)
	}
	served := map[string]bool{}
	for _, p := range st.Processes {
		if p.MetricsAddr == "" || p.PID == 0 {
			continue
		}
		_, body, err := httpGet("http://" + p.MetricsAddr + "/metrics")
		if err != nil {
			t.Fatalf("metrics of %s: %v", p.Name, err)
		}
		for _, line := range strings.Split(body, "\n") {
			if name, _, _ := strings.Cut(strings.SplitN(line, " ", 2)[0], "{"); name != "" && !strings.HasPrefix(name, "#") {
				served[name] = true
			}
		}
	}
	name := regexp.MustCompile(`cairn_[a-z0-9_]+`)
	checked := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, m := range name.FindAllString(tg.Expr, -1) {
				checked++
				if !served[m] {
					t.Errorf("dashboard panel %q queries %s, which no playground process serves", p.Title, m)
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("the dashboard names no metric")
	}
}
