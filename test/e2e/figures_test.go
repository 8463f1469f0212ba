package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"
)

// figuresAgree: cairn-ops status, cairn-ops list chunkserver and each
// chunkserver's own metrics give the same chunk file figures: free
// (formatted and ready) and growable (what the pool may still create), per
// chunkserver and summed.
func (e *env) figuresAgree(t *testing.T) {
	st := e.pg.state(t)
	ops := func(args ...string) map[string]any {
		t.Helper()
		out, err := testtool.Run(t, time.Minute, filepath.Join(binDir, "cairn-ops"), append(append(opsArgs(st), "-o", "json"), args...)...)
		m := map[string]any{}
		if jerr := json.Unmarshal([]byte(out), &m); jerr != nil {
			t.Fatalf("cairn-ops %v: %v, %v\n%s", args, err, jerr, out)
		}
		return m
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cl, err := e.mds.Cluster().GetClusterStatus(ctx, &mdspb.GetClusterStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	chunk := float64(cl.GetConstants().GetChunkSize())
	soon.Succeeds(t, time.Minute, func() error {
		list := ops("list", "chunkserver")
		status := ops("status")
		cluster := 0.0
		var sumFree, sumGrowable float64
		for _, x := range list["chunkservers"].([]any) {
			cs := x.(map[string]any)
			free, growable := cs["pool_free_chunks"].(float64), cs["pool_growable_chunks"].(float64)
			sumFree += free
			sumGrowable += growable
			var metrics string
			for _, p := range st.Processes {
				if p.Addr == cs["address"] {
					metrics = "http://" + p.MetricsAddr + "/metrics"
				}
			}
			if metrics == "" {
				return fmt.Errorf("no playground process at %v", cs["address"])
			}
			if m := metric(t, metrics, "cairn_chunkserver_pool_free_chunks"); m != free {
				return fmt.Errorf("chunkserver %v: list says %v free chunk files, its metric %v", cs["id"], free, m)
			}
			if m := metric(t, metrics, "cairn_chunkserver_pool_growable_chunks"); m != growable {
				return fmt.Errorf("chunkserver %v: list says %v growable chunk files, its metric %v", cs["id"], growable, m)
			}
			if growable == 0 {
				return fmt.Errorf("chunkserver %v reports nothing growable under --pool-max 2GiB", cs["id"])
			}
			cluster++
		}
		space := status["space"].(map[string]any)
		if got := space["pool_free_bytes"].(float64); got != sumFree*chunk {
			return fmt.Errorf("status: %v free bytes, list: %v", got, sumFree*chunk)
		}
		if got := space["pool_growable_bytes"].(float64); got != sumGrowable*chunk {
			return fmt.Errorf("status: %v growable bytes, list: %v", got, sumGrowable*chunk)
		}
		if cluster != 3 {
			return fmt.Errorf("%v chunkservers listed", cluster)
		}
		return nil
	})
}
