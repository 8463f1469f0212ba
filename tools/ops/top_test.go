package ops

import (
	"context"
	"testing"
	"time"

	"cairn.io/cairn/gateway"
	"cairn.io/cairn/test/cluster"
	"cairn.io/cairn/test/nemesis/nbdc"
)

// TestTop: with a writer on a gateway's NBD export, top shows the volume
// with its write IOPS, MiB/s and latency from the gateway's metrics, and
// nothing read; a metrics address that is not a gateway's is refused.
func TestTop(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a cluster of three chunkservers and a gateway")
	}
	c := &liveCluster{Cluster: cluster.Start(t, cluster.Options{}), t: t}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c.jsonRun(ExitOK, "create", "volume", "vol", "--size", "64MiB")
	g, err := gateway.New(gateway.Config{
		MDSAddrs: []string{c.MDS.Addr()}, NBDAddr: "127.0.0.1:0", ISCSIAddr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0",
		Volumes: []string{"vol"}, Logger: cluster.Logger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer g.Stop()
	conn, err := nbdc.Dial(ctx, g.NBDAddr(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for k := 0; ; k++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if err := conn.WriteAt(ctx, buf, int64(k%256)*int64(len(buf))); err != nil {
				done <- err
				return
			}
		}
	}()
	m := c.jsonRun(ExitOK, "top", "--gateway", g.MetricsAddr(), "--interval", "1s")
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if jlen(t, m, "volumes") != 1 || jstr(t, m, "volumes.0.volume") != "vol" {
		t.Fatalf("top: %v", m)
	}
	v := jget(t, m, "volumes.0").(map[string]any)
	if v["write_iops"].(float64) <= 0 || v["write_mib_per_s"].(float64) <= 0 || v["write_latency_ms"].(float64) <= 0 || v["read_iops"].(float64) != 0 {
		t.Fatalf("top figures: %v", v)
	}
	t.Logf("top: %v", v)
	if r := c.run("top", "--gateway", c.MDS.Addr(), "--interval", "100ms"); r.code != ExitUnreachable {
		t.Fatalf("top of an MDS address: exit %d, %q", r.code, r.stderr)
	}
}
