package ops

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"cairn.io/cairn/api/mdspb"
)

// goldenRun renders one run for a golden file: the command line, the exit
// code with its name, and what it wrote to each stream.
func goldenRun(args []string, r runResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "$ cairn-ops %s\n", strings.Join(args, " "))
	fmt.Fprintf(&b, "exit %d (%s)\n", r.code, codeName(r.code))
	if r.stdout != "" {
		b.WriteString("--- stdout\n" + r.stdout)
	}
	if r.stderr != "" {
		b.WriteString("--- stderr\n" + r.stderr)
	}
	return b.String()
}

// TestErrorGoldens runs representative failing invocations and compares
// each one's exit code and what it printed (the error line on stderr, the
// JSON error object on stdout with -o json) with testdata/errors/NAME.golden.
func TestErrorGoldens(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	c.mustRun("create", "pool", "lp1", "--physical-pool", "pool0", "--copysets-per-chunkserver", "1")
	c.mustRun("create", "volume", "vol0", "--size", "16MiB", "--pool", "lp0")
	c.mustRun("create", "snapshot", "vol0", "snap1")
	c.mustRun("create", "volume", "busy", "--size", "8MiB", "--pool", "lp0")
	open, err := c.conn.Volumes().OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "busy", Writable: true, Client: "host-a/pid-1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		// mds, when set, replaces the cluster's address and timeout.
		mds  []string
		code int
	}{
		{name: "query_volume_unknown", args: []string{"query", "volume", "nope"}, code: ExitNotFound},
		{name: "query_volume_unknown_json", args: []string{"-o", "json", "query", "volume", "nope"}, code: ExitNotFound},
		{name: "create_volume_bad_size", args: []string{"create", "volume", "v1", "--size", "10XB"}, code: ExitUsage},
		{name: "create_volume_no_size", args: []string{"create", "volume", "v1"}, code: ExitUsage},
		{name: "create_volume_exists", args: []string{"create", "volume", "vol0", "--size", "16MiB"}, code: ExitError},
		{name: "extend_volume_shrink", args: []string{"extend", "volume", "vol0", "--size", "8MiB"}, code: ExitUsage},
		{name: "delete_volume_not_confirmed", stdin: "vol\n", args: []string{"delete", "volume", "vol0"}, code: ExitError},
		{name: "delete_volume_open", args: []string{"delete", "volume", "busy", "--yes"}, code: ExitError},
		{name: "delete_volume_snapshots", args: []string{"delete", "volume", "vol0", "--yes"}, code: ExitError},
		{name: "delete_snapshot_not_confirmed", stdin: "\n", args: []string{"delete", "snapshot", "vol0", "snap1"}, code: ExitError},
		{name: "unknown_flag", args: []string{"list", "volume", "--frob"}, code: ExitUsage},
		{name: "unknown_command", args: []string{"list", "frobs"}, code: ExitUsage},
		{name: "wrong_arg_count", args: []string{"create", "snapshot", "vol0"}, code: ExitUsage},
		{name: "bad_copyset_id", args: []string{"update", "leader", "x:y", "--to", "2"}, code: ExitUsage},
		{name: "unknown_copyset", args: []string{"check", "copyset", "1:99"}, code: ExitNotFound},
		{name: "bare_copyset_two_pools", args: []string{"check", "copyset", "1"}, code: ExitUsage},
		{name: "copyset_not_in_pool", args: []string{"check", "copyset", "--copyset", "lp1:1", "--pool", "lp0"}, code: ExitUsage},
		{name: "bad_output_format", args: []string{"-o", "yaml", "status"}, code: ExitUsage},
		{name: "unreachable_mds", mds: []string{"--mds", "127.0.0.1:1", "--timeout", "300ms"}, args: []string{"list", "zone"}, code: ExitUnreachable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r runResult
			shown := tc.args
			if tc.mds != nil {
				shown = append(append([]string{}, tc.mds...), tc.args...)
				r = runOps(t, tc.stdin, shown...)
			} else {
				r = c.runIn(tc.stdin, tc.args...)
			}
			if r.code != tc.code {
				t.Errorf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, tc.code, r.stdout, r.stderr)
			}
			golden(t, "errors/"+tc.name, c.normalize(goldenRun(shown, r), map[string]string{open.Session.SessionId: "SESSION"}))
		})
	}
}

// operatorAge is the AGE column of list operator, which depends on when
// the test runs.
var operatorAge = regexp.MustCompile(`(?m)^(1:\d+\s+\S+\s+\d+\s+\S+\s+)\d+s`)

// TestOutputGoldens compares the tables of commands that the other tests
// check through JSON with golden files: list snapshot, trash volume, list
// trash, update leader (queued, then waited for) and list operator.
func TestOutputGoldens(t *testing.T) {
	c := newDoubleCluster(t, 3)
	c.createPool(3)
	c.mustRun("create", "volume", "vol0", "--size", "16MiB")
	c.mustRun("create", "snapshot", "vol0", "snap1")
	c.mustRun("create", "snapshot", "vol0", "snap2")
	golden(t, "list_snapshot", c.normalize(c.mustRun("list", "snapshot", "vol0").stdout, nil))

	c.mustRun("create", "volume", "old", "--size", "8MiB")
	golden(t, "trash_volume", c.normalize(c.mustRun("trash", "volume", "old", "--expires", "72h").stdout, nil))
	golden(t, "list_trash", c.normalize(c.mustRun("list", "trash").stdout, nil))

	to := strconv.FormatUint(c.css[1].ID(), 10)
	golden(t, "update_leader_queued", c.normalize(c.mustRun("update", "leader", "1:2", "--to", to).stdout, nil))
	golden(t, "list_operator", operatorAge.ReplaceAllString(c.normalize(c.mustRun("list", "operator").stdout, nil), "${1}Ns"))

	r := c.waitedLeaderTransfer(t, "update", "leader", "1:3", "--to", to, "--wait", "20s")
	golden(t, "update_leader_done", c.normalize(r.stdout, nil))
}

// TestTopTable renders top's table from two fixed scrapes of a gateway's
// metrics (testdata/top_before.prom, top_after.prom) two seconds apart.
func TestTopTable(t *testing.T) {
	var scrapes atomic.Int32
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		name := "top_before.prom"
		if scrapes.Add(1) > 1 {
			name = "top_after.prom"
		}
		data, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_, _ = w.Write(data)
	}))
	defer web.Close()
	addr := strings.TrimPrefix(web.URL, "http://")
	scrape := func() map[volumeKey]*ioCounters {
		got, err := scrapeVolumes(t.Context(), addr)
		if err != nil {
			t.Fatal(err)
		}
		// The gateway as an operator would name it, not the test's port.
		out := map[volumeKey]*ioCounters{}
		for k, v := range got {
			out[volumeKey{gateway: "127.0.0.1:9300", volume: k.volume}] = v
		}
		return out
	}
	before, after := scrape(), scrape()
	sample := &topSample{IntervalSeconds: 2, Volumes: rates(before, after, 2)}
	var b strings.Builder
	tbl := newTable(&b)
	sample.writeTable(tbl)
	if err := tbl.flush(); err != nil {
		t.Fatal(err)
	}
	golden(t, "top", b.String())
}
