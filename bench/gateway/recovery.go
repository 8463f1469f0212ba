package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sort"
	"syscall"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/mds/mdsclient"
)

// measureRecovery fills vol0 of a playground with two chunkservers per
// zone, measures 4 KiB random writes at QD1, then deletes cs0's data
// directory and kills it (the playground restarts it empty: a new
// chunkserver, the old one retired), and measures the same writes in
// slices of 5 s until every copyset is whole again. It prints the
// rebuild's duration, bytes and rate and the latency before and during.
func measureRecovery(bin string, fill uint64, copysets int, rt time.Duration, keep bool) error {
	pg, err := startPlayground(bin, fill, copysets, keep, "--chunkservers-per-zone", "2")
	if err != nil {
		return err
	}
	defer pg.stop()
	st := pg.state
	vol := st.Volume
	var id *certs.Source
	if st.TLS != nil {
		if id, err = certs.Load(st.TLS.Files(), nil); err != nil {
			return err
		}
	}
	conn, err := mdsclient.Dial([]string{st.MDS}, mdsclient.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), TLS: id})
	if err != nil {
		return err
	}
	defer conn.Close()
	fmt.Printf("Cairn recovery benchmark: %s filled (x3 replicas over 6 chunkservers), writes 4 KiB random QD1\n\n", units.FormatBytes(fill))
	logf("fill: writing %s sequentially through %s", units.FormatBytes(fill), vol.NBDURL)
	if _, err := runFio(vol.NBDURL, fill, rt, fioJob{workload: "fill", rw: "write", bs: "1m", qd: 8}); err != nil {
		return err
	}
	job := fioJob{workload: "4 KiB random write, QD1", rw: "randwrite", bs: "4k", qd: 1, timed: true}
	logf("before: %s for %s", job.workload, rt)
	before, err := runFio(vol.NBDURL, fill, rt, job)
	if err != nil {
		return err
	}

	victim := st.Process("cs0")
	lost, err := chunkServerAt(conn, victim.Addr)
	if err != nil {
		return err
	}
	movedBefore := metricValue(st.Process("mds").MetricsAddr, "cairn_mds_replica_bytes_moved_total")
	if err := os.RemoveAll(victim.DataDir); err != nil {
		return err
	}
	if err := syscall.Kill(victim.PID, syscall.SIGKILL); err != nil {
		return err
	}
	start := time.Now()
	logf("deleted %s and killed cs0 (chunkserver %d); writing until every copyset is whole", victim.DataDir, lost)
	done := make(chan time.Duration, 1)
	go func() {
		for {
			if whole(conn, lost) == nil {
				done <- time.Since(start)
				return
			}
			time.Sleep(500 * time.Millisecond)
		}
	}()
	var during []result
	var took time.Duration
	for took == 0 {
		r, err := runFio(vol.NBDURL, fill, 5*time.Second, job)
		if err != nil {
			return err
		}
		during = append(during, r)
		select {
		case took = <-done:
		case <-time.After(0):
		}
		if time.Since(start) > 30*time.Minute {
			return fmt.Errorf("not whole after 30 minutes: %v", whole(conn, lost))
		}
	}
	moved := metricValue(st.Process("mds").MetricsAddr, "cairn_mds_replica_bytes_moved_total") - movedBefore
	gibPerMin := moved / (1 << 30) / took.Minutes()
	fmt.Printf("rebuilt %s of replicas in %s: %.2f GiB/min (%.1f MiB/s)\n", units.FormatBytes(uint64(moved)),
		took.Round(100*time.Millisecond), gibPerMin, moved/(1<<20)/took.Seconds())
	p50s, p99s, iops := make([]float64, 0, len(during)), make([]float64, 0, len(during)), 0.0
	for _, r := range during {
		p50s, p99s = append(p50s, r.P50us), append(p99s, r.P99us)
		iops += r.IOPS / float64(len(during))
	}
	sort.Float64s(p50s)
	fmt.Printf("writes before: %.0f IOPS, p50 %s, p99 %s\n", before.IOPS, lat(before.P50us), lat(before.P99us))
	fmt.Printf("writes during (%d slices of 5 s): %.0f IOPS, p50 %s (median of the slices), p99 %s (worst slice)\n",
		len(during), iops, lat(p50s[len(p50s)/2]), lat(slices.Max(p99s)))
	return nil
}

// chunkServerAt is the id of the readwrite chunkserver at addr.
func chunkServerAt(conn *mdsclient.Conn, addr string) (uint64, error) {
	resp, err := conn.Topology().ListChunkServers(context.Background(), &mdspb.ListChunkServersRequest{})
	if err != nil {
		return 0, err
	}
	for _, cs := range resp.Chunkservers {
		if cs.Address == addr && cs.RwState == mdspb.RWState_RW_STATE_READWRITE {
			return cs.Id, nil
		}
	}
	return 0, fmt.Errorf("no chunkserver at %s", addr)
}

// whole says why the copysets are not all whole again: three voters in
// three zones, none on the lost chunkserver, no operator left.
func whole(conn *mdsclient.Conn, lost uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
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
			if p.ChunkserverId == lost {
				return fmt.Errorf("copyset %s keeps a replica on chunkserver %d", c.Id.Name(), lost)
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
	if n := len(ops.Operators); n > 0 {
		return fmt.Errorf("%d operators pending", n)
	}
	return nil
}
