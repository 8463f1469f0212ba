package gateway

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/iscsi"
	"cairn.io/cairn/nbd"
	"cairn.io/cairn/test/cluster"
)

func nbdURL(g *Gateway, volume string) string { return "nbd://" + g.NBDAddr() + "/" + volume }

func iscsiURL(g *Gateway, volume string) string {
	return "iscsi://" + g.ISCSIAddr() + "/" + g.TargetName(volume) + "/0"
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no MDS", Config{}, "no MDS address"},
		{"blank MDS", Config{MDSAddrs: []string{" , "}}, "no MDS address"},
		{"nothing to serve", Config{MDSAddrs: []string{"127.0.0.1:1"}, NBDAddr: "-", ISCSIAddr: "-"}, "nothing to serve"},
		{"negative poll", Config{MDSAddrs: []string{"127.0.0.1:1"}, PollInterval: -time.Second}, "poll interval"},
		{"negative MDS wait", Config{MDSAddrs: []string{"127.0.0.1:1"}, MDSWait: -time.Second}, "MDS wait"},
		{"bad NBD tuning", Config{MDSAddrs: []string{"127.0.0.1:1"}, NBD: nbd.Config{MaxPayload: 1000}}, "MaxPayload"},
		{"bad iSCSI tuning", Config{MDSAddrs: []string{"127.0.0.1:1"}, ISCSI: iscsi.Config{IQNPrefix: "a:b"}}, "IQN prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestStartFailsOnTakenAddress checks that Start binds nothing when one
// address is in use, and says which.
func TestStartFailsOnTakenAddress(t *testing.T) {
	g1, err := New(Config{MDSAddrs: []string{"127.0.0.1:1"}, NBDAddr: "127.0.0.1:0", ISCSIAddr: "-", MetricsAddr: "-", Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	if err := g1.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g1.Stop()
	g2, err := New(Config{MDSAddrs: []string{"127.0.0.1:1"}, NBDAddr: "127.0.0.1:0", ISCSIAddr: g1.NBDAddr(), MetricsAddr: "-", Logger: cluster.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	err = g2.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "listen iSCSI on "+g1.NBDAddr()) {
		t.Fatalf("Start with a taken iSCSI address: %v", err)
	}
	if g2.NBDAddr() != "" {
		t.Errorf("NBD listener %s left bound after a failed Start", g2.NBDAddr())
	}
	if err := g2.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := g2.Start(context.Background()); !errors.Is(err, ErrStopped) {
		t.Fatalf("Start after Stop: %v, want ErrStopped", err)
	}
}

// TestConnectionsShareOneOpen drives one volume through NBD probes,
// multi-connection copies and an iSCSI session at once: the volume must be
// opened once, and closed once after its last user left and the linger
// passed. Data written over NBD reads back over NBD and over iSCSI.
func TestConnectionsShareOneOpen(t *testing.T) {
	for _, tool := range []string{"nbdinfo", "nbdcopy", "qemu-img", "iscsi-inq"} {
		testtool.Need(t, tool)
	}
	c := startCluster(t, "a")
	vols := newVolumeDoubles(t, c)
	g := startGateway(t, c, func(cfg *Config) { cfg.OpenVolume = vols.Open })

	// A user held by the test keeps the volume open across the tools, so
	// that the count does not depend on how fast they follow each other.
	pin, err := catalog{g}.Open(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	out := testtool.MustRun(t, time.Minute, "nbdinfo", nbdURL(g, "a"))
	if !strings.Contains(out, "export-size: 67108864") || !strings.Contains(out, "cairn volume a (64MiB)") {
		t.Errorf("nbdinfo output lacks the size or description:\n%s", out)
	}
	if !regexp.MustCompile(`can_multi_conn: true`).MatchString(out) {
		t.Errorf("nbdinfo: multi-conn not advertised:\n%s", out)
	}
	dir := t.TempDir()
	in, back := filepath.Join(dir, "in"), filepath.Join(dir, "back")
	want := testtool.RandomFile(t, in, 8<<20)
	testtool.MustRun(t, time.Minute, "nbdcopy", "--connections=4", in, nbdURL(g, "a"))
	testtool.MustRun(t, time.Minute, "nbdcopy", "--connections=4", nbdURL(g, "a"), back)
	compareFiles(t, want, back)
	out = testtool.MustRun(t, time.Minute, "iscsi-inq", iscsiURL(g, "a"))
	if !strings.Contains(out, "Peripheral Device Type:0") && !strings.Contains(strings.ToUpper(out), "DIRECT") {
		t.Errorf("iscsi-inq output unexpected:\n%s", out)
	}
	testtool.MustRun(t, time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, iscsiURL(g, "a"))
	if opens, _ := vols.counts("a"); opens != 1 {
		t.Fatalf("volume opened %d times for probes, copies and a session, want 1", opens)
	}
	// The servers release a connection's export just after the tool exits.
	soon.Succeeds(t, 10*time.Second, func() error {
		if users := g.OpenVolumes()["a"]; users != 1 {
			return fmt.Errorf("users after the tools disconnected: %d, want 1 (the pin)", users)
		}
		return nil
	})
	pin.Close()
	pin.Close() // a second Close must not release another user
	soon.Succeeds(t, 10*time.Second, func() error {
		if _, closes := vols.counts("a"); closes != 1 {
			return fmt.Errorf("volume closed %d times, want 1 after the linger", closes)
		}
		return nil
	})
	if vols.Device("a").Count(blockdevtest.OpFlush) == 0 {
		t.Errorf("volume closed without a flush")
	}
	if len(g.OpenVolumes()) != 0 {
		t.Errorf("open volumes after close: %v", g.OpenVolumes())
	}
	// The next user opens it afresh.
	testtool.MustRun(t, time.Minute, "nbdinfo", nbdURL(g, "a"))
	if opens, _ := vols.counts("a"); opens != 2 {
		t.Fatalf("opens after the linger expired: %d, want 2", opens)
	}
}

// TestLingerAvoidsReopenAndStopCloses: probes that follow each other within
// the linger reuse the open volume; Stop flushes and closes it.
func TestLingerAvoidsReopenAndStopCloses(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	c := startCluster(t, "a")
	vols := newVolumeDoubles(t, c)
	g := startGateway(t, c, func(cfg *Config) {
		cfg.OpenVolume = vols.Open
		cfg.Linger = time.Hour
	})
	for range 3 {
		testtool.MustRun(t, time.Minute, "nbdinfo", nbdURL(g, "a"))
	}
	if opens, closes := vols.counts("a"); opens != 1 || closes != 0 {
		t.Fatalf("after three probes: %d opens, %d closes; want 1 and 0", opens, closes)
	}
	// A connection's user is released when its goroutine sees the hang-up.
	soon.Succeeds(t, 10*time.Second, func() error {
		if got := g.OpenVolumes(); got["a"] != 0 || len(got) != 1 {
			return fmt.Errorf("open volumes while lingering: %v, want a with 0 users", got)
		}
		return nil
	})
	if err := g.Stop(); err != nil {
		t.Fatal(err)
	}
	opens, closes := vols.counts("a")
	if opens != 1 || closes != 1 {
		t.Fatalf("after Stop: %d opens, %d closes; want 1 and 1", opens, closes)
	}
	if vols.Device("a").Count(blockdevtest.OpFlush) == 0 {
		t.Error("Stop closed the volume without a flush")
	}
	if _, err := (catalog{g}).Open(context.Background(), "a"); !errors.Is(err, ErrStopped) {
		t.Errorf("Open after Stop: %v, want ErrStopped", err)
	}
}

// TestExportFilterAndUnknownVolumes: --volumes restricts what is listed and
// what opens; unknown volumes are unknown exports and unknown targets.
func TestExportFilterAndUnknownVolumes(t *testing.T) {
	for _, tool := range []string{"nbdinfo", "iscsi-ls", "iscsi-inq"} {
		testtool.Need(t, tool)
	}
	c := startCluster(t, "a", "b")
	vols := newVolumeDoubles(t, c)
	g := startGateway(t, c, func(cfg *Config) {
		cfg.OpenVolume = vols.Open
		cfg.Volumes = []string{"a", "missing"}
	})
	out := testtool.MustRun(t, time.Minute, "nbdinfo", "--list", "nbd://"+g.NBDAddr())
	if !strings.Contains(out, `export="a"`) || strings.Contains(out, `export="b"`) || strings.Contains(out, "missing") {
		t.Errorf("nbdinfo --list should show a only:\n%s", out)
	}
	out = testtool.MustRun(t, time.Minute, "iscsi-ls", "-s", "iscsi://"+g.ISCSIAddr())
	if !strings.Contains(out, g.TargetName("a")) || strings.Contains(out, g.TargetName("b")) {
		t.Errorf("iscsi-ls should show a's target only:\n%s", out)
	}
	for _, v := range []string{"b", "missing", "nope"} {
		if out, err := testtool.Run(t, time.Minute, "nbdinfo", nbdURL(g, v)); err == nil {
			t.Errorf("nbdinfo of %s succeeded:\n%s", v, out)
		}
		if out, err := testtool.Run(t, time.Minute, "iscsi-inq", iscsiURL(g, v)); err == nil {
			t.Errorf("iscsi-inq of %s succeeded:\n%s", v, out)
		}
	}
	for _, v := range []string{"b", "nope"} {
		if opens, _ := vols.counts(v); opens != 0 {
			t.Errorf("%s opened %d times; it is not exported", v, opens)
		}
	}
	if _, err := (catalog{g}).Open(context.Background(), "b"); !errors.Is(err, blockdev.ErrNotFound) || !errors.Is(err, ErrNotExported) {
		t.Errorf("open of a filtered volume: %v", err)
	}
	if _, err := (catalog{g}).Open(context.Background(), "missing"); !errors.Is(err, blockdev.ErrNotFound) {
		t.Errorf("open of a missing volume: %v", err)
	}
}

// TestFencedVolumeClosesWithoutLinger: a volume fenced by another writer
// keeps its users (new ones join rather than fencing back), closes as soon
// as they are gone, and the next user opens it afresh.
func TestFencedVolumeClosesWithoutLinger(t *testing.T) {
	c := startCluster(t, "a")
	vols := newVolumeDoubles(t, c)
	g := startGateway(t, c, func(cfg *Config) {
		cfg.OpenVolume = vols.Open
		cfg.Linger = time.Hour
	})
	ctx := context.Background()
	h1, err := catalog{g}.Open(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h1.WriteAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	vols.fence("a")
	if _, err := h1.WriteAt(ctx, make([]byte, 4096), 0); !errors.Is(err, ErrFenced) {
		t.Fatalf("write after fencing: %v, want ErrFenced", err)
	}
	h2, err := catalog{g}.Open(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if opens, _ := vols.counts("a"); opens != 1 {
		t.Fatalf("a user joining a fenced volume reopened it (%d opens)", opens)
	}
	h1.Close()
	h2.Close()
	if opens, closes := vols.counts("a"); closes != 1 {
		t.Fatalf("fenced volume without users: %d opens, %d closes; want it closed at once", opens, closes)
	}
	h3, err := catalog{g}.Open(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer h3.Close()
	if _, err := h3.WriteAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatalf("write after reopening: %v", err)
	}
	if opens, _ := vols.counts("a"); opens != 2 {
		t.Fatalf("opens after the fenced volume closed: %d, want 2", opens)
	}
	_, body, err := httpGet("http://" + g.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(body, "cairn_gateway_volumes_fenced_total 1") {
		t.Errorf("metrics lack the fenced count:\n%s", grepLines(body, "fenced"))
	}
}

// TestDeletedVolumeEndsSessions: when a volume disappears from the MDS, its
// iSCSI sessions and NBD connections end, it is no longer listed, and it
// closes.
func TestDeletedVolumeEndsSessions(t *testing.T) {
	for _, tool := range []string{"iscsi-perf", "iscsi-ls", "qemu-io"} {
		testtool.Need(t, tool)
	}
	c := startCluster(t, "d", "keep")
	vols := newVolumeDoubles(t, c)
	g := startGateway(t, c, func(cfg *Config) { cfg.OpenVolume = vols.Open })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// An NBD client keeps a connection open on the volume too.
	qio := exec.CommandContext(ctx, "qemu-io", "-f", "raw", nbdURL(g, "d"))
	qio.Dir = t.TempDir()
	qioIn, err := qio.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer qioIn.Close()
	if err := qio.Start(); err != nil {
		t.Fatal(err)
	}
	qioDone := make(chan error, 1)
	go func() { qioDone <- qio.Wait() }()
	defer func() { qio.Process.Kill(); <-qioDone }()
	soon.Succeeds(t, 30*time.Second, func() error {
		if s := g.NBDStats(); s.Connections != 1 {
			return fmt.Errorf("%d NBD connections", s.Connections)
		}
		return nil
	})
	perf := exec.CommandContext(ctx, "iscsi-perf", "-t", "60", "-m", "4", "-r", iscsiURL(g, "d"))
	perf.Dir = t.TempDir()
	var perfOut strings.Builder
	perf.Stdout, perf.Stderr = &perfOut, &perfOut
	if err := perf.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- perf.Wait() }()
	soon.Succeeds(t, 30*time.Second, func() error {
		if s := g.ISCSIStats(); s.Sessions != 1 || s.Commands < 100 {
			return fmt.Errorf("iSCSI sessions %d, commands %d", s.Sessions, s.Commands)
		}
		return nil
	})
	if _, err := c.Conn.Volumes().DeleteVolume(ctx, &mdspb.DeleteVolumeRequest{Name: "d"}); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 20*time.Second, func() error {
		if s := g.ISCSIStats(); s.Sessions != 0 {
			return fmt.Errorf("%d iSCSI sessions left", s.Sessions)
		}
		if s := g.NBDStats(); s.Connections != 0 {
			return fmt.Errorf("%d NBD connections left", s.Connections)
		}
		if _, closes := vols.counts("d"); closes != 1 {
			return fmt.Errorf("deleted volume closed %d times", closes)
		}
		return nil
	})
	out := testtool.MustRun(t, time.Minute, "iscsi-ls", "-s", "iscsi://"+g.ISCSIAddr())
	if strings.Contains(out, g.TargetName("d")) || !strings.Contains(out, g.TargetName("keep")) {
		t.Errorf("discovery after the delete:\n%s", out)
	}
	// libiscsi logs in again after losing its session, and keeps trying;
	// every attempt must be refused (target not found), none reopen.
	soon.Succeeds(t, 20*time.Second, func() error {
		_, m, err := httpGet("http://" + g.MetricsAddr() + "/metrics")
		if err != nil {
			return err
		}
		if !regexp.MustCompile(`cairn_gateway_volume_open_errors_total [1-9]`).MatchString(m) {
			return fmt.Errorf("no refused login yet:\n%s", grepLines(m, "cairn_gateway_volume"))
		}
		return nil
	})
	perf.Process.Kill()
	<-exited
	if s := g.ISCSIStats(); s.Sessions != 0 {
		t.Errorf("%d iSCSI sessions after the delete", s.Sessions)
	}
	if opens, _ := vols.counts("d"); opens != 1 {
		t.Errorf("deleted volume opened %d times (an initiator reconnecting must not reopen it)", opens)
	}
}

// TestMetricsAndHealth: /healthz follows the MDS's reachability and
// /metrics carries the frontends' counters.
func TestMetricsAndHealth(t *testing.T) {
	testtool.Need(t, "nbdcopy")
	c := startCluster(t, "a")
	vols := newVolumeDoubles(t, c)
	g := startGateway(t, c, func(cfg *Config) { cfg.OpenVolume = vols.Open })
	base := "http://" + g.MetricsAddr()
	soon.Succeeds(t, 10*time.Second, func() error {
		code, body, err := httpGet(base + "/healthz")
		if err != nil || code != 200 || !strings.HasPrefix(body, "ok ") {
			return fmt.Errorf("healthz %d %q %v", code, body, err)
		}
		return nil
	})
	dir := t.TempDir()
	testtool.RandomFile(t, filepath.Join(dir, "in"), 4<<20)
	testtool.MustRun(t, time.Minute, "nbdcopy", filepath.Join(dir, "in"), nbdURL(g, "a"))
	// Counters are updated after each reply; a connection ends only after
	// its requests have finished.
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := g.NBDStats().Connections; n != 0 {
			return fmt.Errorf("%d NBD connections", n)
		}
		return nil
	})
	_, body, err := httpGet(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, re := range []string{
		`cairn_gateway_nbd_requests_total\{command="write"\} [1-9]`,
		`cairn_gateway_nbd_bytes_total\{direction="write"\} 4\.194304e\+06`,
		`cairn_gateway_nbd_request_duration_seconds_count\{command="write"\} [1-9]`,
		`cairn_gateway_nbd_connections_total [1-9]`,
		`cairn_gateway_nbd_inline_reads_total \d`,
		`cairn_gateway_volume_opens_total 1`,
		`cairn_gateway_volumes_exported 1`,
		`cairn_gateway_iscsi_sessions 0`,
		`go_goroutines \d`,
	} {
		if !regexp.MustCompile(re).MatchString(body) {
			t.Errorf("metrics lack %s", re)
		}
	}
	c.MDS.Stop()
	soon.Succeeds(t, 30*time.Second, func() error {
		code, body, err := httpGet(base + "/healthz")
		if err != nil {
			return err
		}
		if code != 503 || !strings.Contains(body, "MDS unreachable") {
			return fmt.Errorf("healthz with the MDS stopped: %d %q", code, body)
		}
		return nil
	})
	_, body, _ = httpGet(base + "/metrics")
	if m := regexp.MustCompile(`cairn_gateway_mds_poll_errors_total (\d+)`).FindStringSubmatch(body); m == nil || m[1] == "0" {
		t.Errorf("poll errors not counted: %v", m)
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestCHAPSecretsFile: secrets read from a file protect discovery and every
// target, with a volume's own secrets taking precedence over the default.
func TestCHAPSecretsFile(t *testing.T) {
	for _, tool := range []string{"iscsi-inq", "iscsi-ls"} {
		testtool.Need(t, tool)
	}
	path := filepath.Join(t.TempDir(), "chap.json")
	if err := os.WriteFile(path, []byte(`{
		"default":   {"user": "node", "secret": "node-secret-16ch"},
		"discovery": {"user": "disc", "secret": "discovery-secret"},
		"targets":   {"db": {"user": "db-node", "secret": "db-secret-16char"}}
	}`), 0o600); err != nil {
		t.Fatal(err)
	}
	secrets, err := iscsi.ReadCHAPSecrets(path)
	if err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, "db", "web")
	g := startGateway(t, c, func(cfg *Config) { secrets.Apply(&cfg.ISCSI) })
	url := func(cred, vol string) string {
		return "iscsi://" + cred + g.ISCSIAddr() + "/" + g.TargetName(vol) + "/0"
	}
	for _, tc := range []struct {
		name, url string
		ok        bool
	}{
		{"volume's own secret", url("db-node%db-secret-16char@", "db"), true},
		{"default secret on a volume with its own", url("node%node-secret-16ch@", "db"), false},
		{"default secret", url("node%node-secret-16ch@", "web"), true},
		{"wrong secret", url("node%not-the-secret-1@", "web"), false},
		{"no credentials", url("", "web"), false},
	} {
		out, err := testtool.Run(t, 30*time.Second, "iscsi-inq", tc.url)
		if tc.ok && (err != nil || !strings.Contains(out, "Vendor:CAIRN")) {
			t.Errorf("%s: login failed: %v\n%s", tc.name, err, out)
		}
		if !tc.ok && err == nil {
			t.Errorf("%s: login succeeded, want failure:\n%s", tc.name, out)
		}
	}
	if out, err := testtool.Run(t, 30*time.Second, "iscsi-ls", "iscsi://"+g.ISCSIAddr()); err == nil {
		t.Errorf("discovery without CHAP succeeded:\n%s", out)
	}
	out := testtool.MustRun(t, 30*time.Second, "iscsi-ls", "iscsi://disc%discovery-secret@"+g.ISCSIAddr())
	if !strings.Contains(out, g.TargetName("db")) || !strings.Contains(out, g.TargetName("web")) {
		t.Errorf("discovery with CHAP:\n%s", out)
	}
}
