// Command copyset measures what the shared group-commit WAL buys: committed
// 4 KiB writes per second and Raft entries per fdatasync for 1, 10 and 100
// copysets on three chunkservers (in one process, real files, real gRPC and
// wire on loopback), with the shared WAL and with one WAL per copyset (the
// Curve/braft layout), side by side in one run.
//
//	go run ./bench/copyset -copysets 1,10,100 -duration 10s
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"

	"cairn.io/cairn/chunkfilepool"
	"cairn.io/cairn/chunkserver/datastore"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/copyset/wal"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/internal/wire"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-copyset:", err)
		os.Exit(1)
	}
}

type result struct {
	copysets    int
	layout      string
	writes      uint64
	elapsed     time.Duration
	syncs, ents uint64
	p50, p99    time.Duration
}

func run() error {
	var (
		counts   = flag.String("copysets", "1,10,100", "copyset counts to measure")
		duration = flag.Duration("duration", 10*time.Second, "load time per configuration")
		inflight = flag.Int("inflight", 64, "writes in flight (spread over the copysets)")
		dir      = flag.String("dir", "", "scratch directory (default: a temporary one, removed after)")
		chunk    units.Bytes
	)
	chunk = 1 << 20
	flag.Var(&chunk, "chunk-size", "chunk (and WAL segment) size")
	flag.Parse()
	if *dir == "" {
		d, err := os.MkdirTemp("", "cairn-bench-copyset")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		*dir = d
	}
	var ns []int
	for _, s := range strings.Split(*counts, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			return fmt.Errorf("bad copyset count %q", s)
		}
		ns = append(ns, n)
	}
	fmt.Printf("3 chunkservers in one process, %d writes of 4 KiB in flight, %v per configuration, chunk/segment %s\n\n",
		*inflight, *duration, units.FormatBytes(uint64(chunk)))
	var results []result
	for _, n := range ns {
		for _, perCopyset := range []bool{false, true} {
			r, err := measure(filepath.Join(*dir, fmt.Sprintf("%d-%v", n, perCopyset)), n, perCopyset, *inflight, *duration, int64(chunk))
			if err != nil {
				return err
			}
			results = append(results, r)
			fmt.Fprintf(os.Stderr, "  %d copysets, %s WAL: %.0f writes/s\n", n, r.layout, float64(r.writes)/r.elapsed.Seconds())
		}
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "copysets\tWAL\twrites/s\tp50\tp99\tfdatasyncs/s\tentries/fdatasync\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%d\t%s\t%.0f\t%v\t%v\t%.0f\t%.1f\t\n", r.copysets, r.layout,
			float64(r.writes)/r.elapsed.Seconds(), r.p50.Round(10*time.Microsecond), r.p99.Round(10*time.Microsecond),
			float64(r.syncs)/r.elapsed.Seconds(), float64(r.ents)/max(float64(r.syncs), 1))
	}
	tw.Flush()
	fmt.Println()
	for i := 0; i+1 < len(results); i += 2 {
		s, p := results[i], results[i+1]
		fmt.Printf("%d copysets: shared/per-copyset %.2fx writes/s, %.1fx entries per fdatasync\n", s.copysets,
			(float64(s.writes)/s.elapsed.Seconds())/max(float64(p.writes)/p.elapsed.Seconds(), 1),
			(float64(s.ents)/max(float64(s.syncs), 1))/max(float64(p.ents)/max(float64(p.syncs), 1), 0.001))
	}
	return nil
}

type resolver struct {
	mu    sync.Mutex
	addrs map[uint64]string
}

func (r *resolver) Resolve(_ context.Context, id uint64) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if a, ok := r.addrs[id]; ok {
		return a, nil
	}
	return "", fmt.Errorf("no chunkserver %d", id)
}

// cluster is the engines of one measurement and what they run on.
type cluster struct {
	engines  []*copyset.Engine
	pools    []*chunkfilepool.Pool
	servers  []*grpc.Server
	wservers []*wire.Server
}

func (cl *cluster) close() {
	for _, s := range cl.servers {
		s.Stop()
	}
	for _, s := range cl.wservers {
		_ = s.Close()
	}
	for _, e := range cl.engines {
		e.Close()
	}
	for _, p := range cl.pools {
		p.Close()
	}
}

// startEngine starts chunkserver id's engine in dir, serving on loopback,
// and records its address in rs.
func (cl *cluster) startEngine(id uint64, dir string, pool *chunkfilepool.Pool, fc *datastore.FileCache, rs *resolver,
	onSync func(wal.SyncInfo), workers int, chunkSize int64) (*copyset.Engine, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	rs.mu.Lock()
	rs.addrs[id] = lis.Addr().String()
	rs.mu.Unlock()
	e, err := copyset.NewEngine(copyset.Config{
		NodeID: id, Dir: dir, Segments: pool, ChunkSize: chunkSize,
		OpenStore: func(d string) (copyset.ChunkStore, error) {
			return datastore.Open(d, pool, datastore.Options{Files: fc})
		},
		Resolver: rs, OnWALSync: onSync, RaftWorkers: workers, ApplyWorkers: workers,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		lis.Close()
		return nil, err
	}
	cl.engines = append(cl.engines, e)
	srv, wsrv := grpc.NewServer(), wire.NewServer(wire.ServerOptions{})
	e.Register(srv, wsrv)
	wire.ServeSplit(lis, wsrv, srv)
	cl.servers = append(cl.servers, srv)
	cl.wservers = append(cl.wservers, wsrv)
	return e, nil
}

// measure runs the load on n copysets over three chunkservers. With the
// shared layout each chunkserver is one engine (one WAL for all its
// copysets); with perCopyset each copyset replica is an engine of its own
// (its own WAL, as in Curve and braft), the replicas of one copyset
// finding each other through a resolver of their own.
func measure(dir string, n int, perCopyset bool, inflight int, d time.Duration, chunkSize int64) (result, error) {
	res := result{copysets: n, layout: "shared"}
	if perCopyset {
		res.layout = "per-copyset"
	}
	defer os.RemoveAll(dir)
	var syncs, ents atomic.Uint64
	onSync := func(si wal.SyncInfo) {
		syncs.Add(1)
		ents.Add(uint64(si.Entries))
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	cl := &cluster{}
	defer cl.close()
	files := n + 64
	if perCopyset {
		files += 4 * n
	}
	ids := make([]copyset.GroupID, n)
	for i := range ids {
		ids[i] = copyset.MakeGroupID(1, uint32(i+1))
	}
	// hosts[i] are the engines holding copyset i's replicas.
	hosts := make([][]*copyset.Engine, n)
	shared := &resolver{addrs: map[uint64]string{}}
	perGroup := make([]*resolver, n)
	for i := range perGroup {
		perGroup[i] = &resolver{addrs: map[uint64]string{}}
	}
	for id := uint64(1); id <= 3; id++ {
		nd := filepath.Join(dir, fmt.Sprint("cs", id))
		pool, err := chunkfilepool.Open(chunkfilepool.Options{
			Dir: filepath.Join(nd, "pool"), ChunkSize: chunkSize, MetaPageSize: 4096, BlockSize: 512,
			InitialChunks: files, MaxChunks: 2 * files, Logger: quiet,
		})
		if err != nil {
			return res, err
		}
		cl.pools = append(cl.pools, pool)
		for pool.Stats().FormatPercent < 100 {
			time.Sleep(50 * time.Millisecond)
		}
		fc := datastore.NewFileCache(1024)
		if !perCopyset {
			e, err := cl.startEngine(id, filepath.Join(nd, "engine"), pool, fc, shared, onSync, 0, chunkSize)
			if err != nil {
				return res, err
			}
			for i := range hosts {
				hosts[i] = append(hosts[i], e)
			}
			continue
		}
		for i := range hosts {
			e, err := cl.startEngine(id, filepath.Join(nd, fmt.Sprint("engine-", i)), pool, fc, perGroup[i], onSync, 1, chunkSize)
			if err != nil {
				return res, err
			}
			hosts[i] = append(hosts[i], e)
		}
	}
	for i := range ids {
		for _, e := range hosts[i] {
			if err := e.Create(ids[i], []uint64{1, 2, 3}); err != nil {
				return res, err
			}
		}
	}
	leaders := make([]*copyset.Copyset, n)
	deadline := time.Now().Add(time.Minute)
	for i := range ids {
		for leaders[i] == nil {
			for _, e := range hosts[i] {
				if c, err := e.Get(ids[i]); err == nil && c.IsLeader() {
					leaders[i] = c
				}
			}
			if time.Now().After(deadline) {
				return res, fmt.Errorf("copyset %s elected no leader", ids[i])
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// Warm up: create each copyset's chunk so the run measures overwrites.
	data := make([]byte, 4096)
	for _, c := range leaders {
		p, err := c.ProposeWrite(context.Background(), nil, copyset.ClientRequest{}, 1, 1, 1, 0, data)
		if err == nil {
			_, err = p.Wait(context.Background())
		}
		if err != nil {
			return res, err
		}
	}
	syncs.Store(0)
	ents.Store(0)
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var writes atomic.Uint64
	lat := make([][]time.Duration, inflight)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < inflight; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			buf := make([]byte, 4096)
			for k := 0; ctx.Err() == nil; k++ {
				c := leaders[(w+k)%n]
				off := int64(rng.IntN(int(chunkSize/4096))) * 4096
				t0 := time.Now()
				p, err := c.ProposeWrite(ctx, nil, copyset.ClientRequest{}, 1, 1, 1, off, buf)
				if err != nil {
					continue
				}
				if _, err := p.Wait(ctx); err != nil {
					continue
				}
				lat[w] = append(lat[w], time.Since(t0))
				writes.Add(1)
			}
		}(w)
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.writes, res.syncs, res.ents = writes.Load(), syncs.Load(), ents.Load()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	if len(all) > 0 {
		slices.Sort(all)
		res.p50, res.p99 = all[len(all)/2], all[len(all)*99/100]
	}
	return res, nil
}
