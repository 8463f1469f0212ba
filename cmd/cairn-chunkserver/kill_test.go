package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/mds"
	"cairn.io/cairn/mds/mdsclient"
	"cairn.io/cairn/test/cluster"
)

// binPath is the cairn-chunkserver binary built for these tests.
var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cairn-chunkserver-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "cairn-chunkserver")
	build := exec.Command("go", "build", "-o", binPath, ".")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build cairn-chunkserver:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one chunkserver process. It listens on a port the kernel picks
// at each start and registers it with the MDS: a port found free and then
// closed by the test could be taken by anything meanwhile.
type proc struct {
	dir, addr, zone string
	cmd             *exec.Cmd
	log             *bytes.Buffer
}

func (p *proc) start(t *testing.T, mdsAddr string) {
	t.Helper()
	p.log = &bytes.Buffer{}
	p.cmd = exec.Command(binPath, "--data-dir", p.dir, "--listen", p.addr, "--metrics-listen", "-",
		"--mds", mdsAddr, "--zone", p.zone, "--hostname", "host-"+p.zone,
		"--pool-size", "16MiB", "--pool-max", "512MiB", "--pool-reserve", "64MiB", "--log-level", "warn", "--insecure")
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
}

// kill9 kills the process with SIGKILL: nothing is flushed or closed.
func (p *proc) kill9() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	_ = p.cmd.Wait()
}

// TestKill9LosesNothingAcknowledged runs three chunkserver processes, kills
// the busiest one with SIGKILL in the middle of writes, restarts it, then
// kills all three at once and restarts them: every write that was
// acknowledged must read back.
func TestKill9LosesNothingAcknowledged(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test")
	}
	root := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	m, err := mds.New(mds.Config{
		DataDir: filepath.Join(root, "mds"), ListenAddr: "127.0.0.1:0", MetricsAddr: "-",
		Constants:         &mdspb.ClusterConstants{ChunkSize: 1 << 20, SegmentSize: 64 << 20},
		HeartbeatInterval: 200 * time.Millisecond, Logger: cluster.Logger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer m.Stop()
	conn, err := mdsclient.Dial([]string{m.Addr()}, mdsclient.Options{Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	procs := make([]*proc, 3)
	for i := range procs {
		procs[i] = &proc{dir: filepath.Join(root, fmt.Sprint("cs", i)), addr: "127.0.0.1:0", zone: fmt.Sprint("z", i)}
		procs[i].start(t, m.Addr())
	}
	defer func() {
		for _, p := range procs {
			p.kill9()
		}
		if t.Failed() {
			for i, p := range procs {
				t.Logf("chunkserver %d log:\n%s", i, p.log.String())
			}
		}
	}()
	soon.Succeeds(t, time.Minute, func() error {
		r, err := conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
		if err != nil {
			return err
		}
		if len(r.GetChunkservers()) != 3 {
			return fmt.Errorf("%d chunkservers registered", len(r.GetChunkservers()))
		}
		return nil
	})
	if _, err := conn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{Name: "p", PhysicalPool: "pool1", CopysetsPerChunkserver: 6}); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{Name: "v", Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	o, err := conn.Volumes().OpenVolume(ctx, &mdspb.OpenVolumeRequest{Name: "v", Writable: true})
	if err != nil {
		t.Fatal(err)
	}
	seg, err := conn.Volumes().GetSegment(ctx, &mdspb.GetSegmentRequest{Name: "v", Allocate: true})
	if err != nil {
		t.Fatal(err)
	}
	vol, epoch, chunks := o.GetVolume().GetId(), o.GetVolume().GetEpoch(), seg.GetSegment().GetChunks()[:12]
	cc := cluster.NewChunkClient(t, conn)

	// Each writer owns its blocks and writes them in turn, so the last
	// acknowledged value of every block is known; a write whose answer was
	// lost in a kill may or may not have landed.
	type block struct{ chunk, off int }
	type state struct{ acked, maybe uint64 }
	var mu sync.Mutex
	blocks := map[block]*state{}
	var stop sync.WaitGroup
	done := make(chan struct{})
	for w := 0; w < 6; w++ {
		stop.Add(1)
		go func(w int) {
			defer stop.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			seq := uint64(0)
			for {
				select {
				case <-done:
					return
				default:
				}
				b := block{chunk: rng.Intn(len(chunks)), off: (rng.Intn(32)*6 + w) * 4096}
				seq++
				val := uint64(w+1)<<32 | seq
				mu.Lock()
				st := blocks[b]
				if st == nil {
					st = &state{}
					blocks[b] = st
				}
				st.maybe = val
				mu.Unlock()
				ch := chunks[b.chunk]
				wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
				s, err := cc.Write(wctx, ch.GetCopyset(), ch.GetChunkId(), vol, epoch, uint64(b.off), blockOf(val))
				wcancel()
				mu.Lock()
				if err == nil && s == chunkpb.Status_STATUS_OK {
					st.acked, st.maybe = val, 0
				} else if err == nil {
					t.Errorf("write refused: %v", s)
				}
				mu.Unlock()
			}
		}(w)
	}
	acked := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, st := range blocks {
			if st.acked != 0 {
				n++
			}
		}
		return n
	}
	soon.Succeeds(t, time.Minute, func() error {
		if n := acked(); n < 50 {
			return fmt.Errorf("%d blocks acknowledged", n)
		}
		return nil
	})
	// Kill the chunkserver that leads the most copysets, keep writing,
	// bring it back.
	busiest := busiestProc(t, ctx, conn, procs)
	t.Logf("kill -9 the chunkserver of zone %s", procs[busiest].zone)
	procs[busiest].kill9()
	before := acked()
	soon.Succeeds(t, time.Minute, func() error {
		if n := acked(); n < before+30 {
			return fmt.Errorf("writes stalled after the kill: %d -> %d", before, n)
		}
		return nil
	})
	procs[busiest].start(t, m.Addr())
	time.Sleep(2 * time.Second)
	// Now all three at once.
	t.Logf("kill -9 all chunkservers")
	for _, p := range procs {
		p.kill9()
	}
	close(done)
	stop.Wait()
	for _, p := range procs {
		p.start(t, m.Addr())
	}
	mu.Lock()
	defer mu.Unlock()
	checked := 0
	for b, st := range blocks {
		ch := chunks[b.chunk]
		rctx, rcancel := context.WithTimeout(ctx, 60*time.Second)
		got, s, err := cc.Read(rctx, ch.GetCopyset(), ch.GetChunkId(), vol, uint64(b.off), 4096)
		rcancel()
		if err != nil {
			t.Fatalf("read block %v after restart: %v %v", b, s, err)
		}
		v := binary.LittleEndian.Uint64(got)
		if !bytes.Equal(got, blockOf(v)) {
			t.Fatalf("block %v is torn after restart", b)
		}
		if v != st.acked && (st.maybe == 0 || v != st.maybe) {
			t.Fatalf("block %v reads %x; last acknowledged %x (unacknowledged in flight: %x)", b, v, st.acked, st.maybe)
		}
		if st.acked != 0 {
			checked++
		}
	}
	t.Logf("%d acknowledged blocks verified after kill -9", checked)
}

func blockOf(v uint64) []byte {
	b := make([]byte, 4096)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], v)
	}
	return b
}

func busiestProc(t *testing.T, ctx context.Context, conn *mdsclient.Conn, procs []*proc) int {
	r, err := conn.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	best, most := 0, -1
	for _, cs := range r.GetChunkservers() {
		for i, p := range procs {
			if p.zone == cs.GetZone() && int(cs.GetLeaderCount()) > most {
				best, most = i, int(cs.GetLeaderCount())
			}
		}
	}
	return best
}
