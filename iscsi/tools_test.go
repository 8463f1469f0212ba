package iscsi

import (
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"
)

// testTarget is a Server on an ephemeral loopback port with file volumes.
type testTarget struct {
	srv     *Server
	exports *fileExports
	addr    string
	done    chan error
}

func startTarget(t *testing.T, mutate func(*Config), vols map[string]int64) *testTarget {
	t.Helper()
	ex := newFileExports(t.TempDir())
	for n, s := range vols {
		if err := ex.create(n, s); err != nil {
			t.Fatal(err)
		}
	}
	level := slog.LevelWarn
	if os.Getenv("ISCSI_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	cfg := Config{
		Exports: ex,
		Logger:  slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tt := &testTarget{srv: srv, exports: ex, addr: ln.Addr().String(), done: make(chan error, 1)}
	go func() { tt.done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-tt.done; err != ErrServerClosed {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return tt
}

func (tt *testTarget) url(volume string) string {
	return "iscsi://" + tt.addr + "/" + tt.srv.TargetName(volume) + "/0"
}

func TestDiscoveryWithIscsiLs(t *testing.T) {
	testtool.Need(t, "iscsi-ls")
	tt := startTarget(t, nil, map[string]int64{"vol-a": 64 << 20, "vol-b": 32 << 20})
	out, err := testtool.Run(t, 30*time.Second, "iscsi-ls", "-s", "iscsi://"+tt.addr)
	if err != nil {
		t.Fatalf("iscsi-ls: %v\n%s", err, out)
	}
	for _, want := range []string{
		"Target:" + tt.srv.TargetName("vol-a") + " Portal:" + tt.addr + ",1",
		"Target:" + tt.srv.TargetName("vol-b") + " Portal:" + tt.addr + ",1",
		"Lun:0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("iscsi-ls output lacks %q:\n%s", want, out)
		}
	}
	t.Log(out)
}

func contextWithTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func TestInquiryVPDPagesWithIscsiInq(t *testing.T) {
	testtool.Need(t, "iscsi-inq")
	tt := startTarget(t, nil, map[string]int64{"inq": 64 << 20})
	cases := []struct {
		page string
		want []string
	}{
		{"", []string{"Peripheral Device Type:DIRECT_ACCESS", "Vendor:CAIRN", "Product:VOLUME", "CmdQue:1", "HiSup:1", "Version Descriptor:0960 iSCSI", "Version Descriptor:04c0 SBC-3"}},
		{"0", []string{"Page:0x00 SUPPORTED_VPD_PAGES", "Page:0x80 UNIT_SERIAL_NUMBER", "Page:0x83 DEVICE_IDENTIFICATION", "Page:0xb0 BLOCK_LIMITS", "Page:0xb1 BLOCK_DEVICE_CHARACTERISTICS", "Page:0xb2 LOGICAL_BLOCK_PROVISIONING"}},
		{"128", []string{"Unit Serial Number:["}},
		{"131", []string{"Designator Type:(3) NAA", "Designator Type:(1) T10_VENDORT_ID", "Designator:[CAIRN", "Association:(0) LOGICAL_UNIT", "Designator Type:(4) RELATIVE_TARGET_PORT"}},
		{"176", []string{"maximum compare and write length:255", "optimal transfer length granularity:8", "maximum transfer length:32768", "maximum unmap lba count:1048576", "maximum unmap block descriptor count:256", "optimal unmap granularity:8", "wsnz:1", "maximum write same length:32768"}},
		{"177", []string{"Medium Rotation Rate:1RPM"}},
		{"178", []string{"lbpu:1", "lbpws:1", "lbpws10:1", "lbprz:1", "provisioning type:2"}},
	}
	for _, c := range cases {
		args := []string{tt.url("inq")}
		if c.page != "" {
			args = []string{"-e", "1", "-c", c.page, tt.url("inq")}
		}
		out, err := testtool.Run(t, 30*time.Second, "iscsi-inq", args...)
		if err != nil {
			t.Fatalf("iscsi-inq page %q: %v\n%s", c.page, err, out)
		}
		for _, w := range c.want {
			if !strings.Contains(out, w) {
				t.Errorf("iscsi-inq page %q: output lacks %q:\n%s", c.page, w, out)
			}
		}
	}
	// An unsupported page is an error, not garbage.
	if out, err := testtool.Run(t, 30*time.Second, "iscsi-inq", "-e", "1", "-c", "134", tt.url("inq")); err == nil {
		t.Errorf("iscsi-inq of unsupported VPD page 0x86 succeeded:\n%s", out)
	}
}

func TestReadCapacity16WithTool(t *testing.T) {
	testtool.Need(t, "iscsi-readcapacity16")
	tt := startTarget(t, nil, map[string]int64{"cap": 96 << 20})
	out, err := testtool.Run(t, 30*time.Second, "iscsi-readcapacity16", tt.url("cap"))
	if err != nil {
		t.Fatalf("iscsi-readcapacity16: %v\n%s", err, out)
	}
	for _, w := range []string{
		"RETURNED LOGICAL BLOCK ADDRESS:" + itoa(96<<20/512-1),
		"LOGICAL BLOCK LENGTH IN BYTES:512",
		"LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3",
		"LBPME:1 LBPRZ:1",
		"Total size:" + itoa(96<<20),
	} {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
	// Unknown targets are refused at login.
	bad := "iscsi://" + tt.addr + "/" + tt.srv.TargetName("nope") + "/0"
	if out, err := testtool.Run(t, 30*time.Second, "iscsi-readcapacity16", bad); err == nil {
		t.Errorf("login to a target without volume succeeded:\n%s", out)
	}
}

func TestQemuImgConvertAndCompare(t *testing.T) {
	t.Run("defaults", func(t *testing.T) { qemuConvertCompare(t, nil) })
	// A session buffer smaller than qemu's preferred writes: the target
	// advertises a smaller MAXIMUM TRANSFER LENGTH, writes wait for memory
	// (no R2T) instead of allocating, and still all complete.
	t.Run("small session buffer", func(t *testing.T) {
		qemuConvertCompare(t, func(c *Config) {
			c.MaxSessionBuffer = 4 << 20
			c.FirstBurstLength = 4096
		})
	})
}

func qemuConvertCompare(t *testing.T, mutate func(*Config)) {
	testtool.Need(t, "qemu-img")
	tt := startTarget(t, mutate, map[string]int64{"qemu": 32 << 20})
	img := filepath.Join(t.TempDir(), "random.raw")
	data := make([]byte, 24<<20)
	rand.NewChaCha8([32]byte{1}).Read(data)
	// Leave a zero hole so sparse detection paths run too.
	clear(data[4<<20 : 6<<20])
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	url := tt.url("qemu")
	if out, err := testtool.Run(t, 2*time.Minute, "qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", img, url); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	// compare reads the LUN back; it is longer than the image, and
	// qemu-img requires the excess to read as zeros.
	if out, err := testtool.Run(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, url); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
	// And the backend file holds exactly the image.
	soon.True(t, 10*time.Second, "volume closed after the last session ended", func() bool {
		return tt.exports.closed("qemu")
	})
	got, err := os.ReadFile(filepath.Join(tt.exports.dir, "qemu"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:len(data)], data) {
		t.Fatal("backend file differs from the image written through the target")
	}
	// A changed byte makes compare fail: the check can fail.
	data[12345] ^= 0xff
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := testtool.Run(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, url); err == nil {
		t.Fatalf("qemu-img compare of a differing image succeeded:\n%s", out)
	}
}

func TestCHAPWithLibiscsi(t *testing.T) {
	testtool.Need(t, "iscsi-inq")
	secrets := CHAP{User: "alice", Secret: "alice-secret-12", MutualUser: "target-cairn", MutualSecret: "target-secret-34"}
	tt := startTarget(t, func(c *Config) {
		c.CHAP = map[string]CHAP{"secure": secrets}
		c.DiscoveryCHAP = &CHAP{User: "disc", Secret: "discovery-secret"}
	}, map[string]int64{"secure": 16 << 20, "open": 16 << 20})
	iqn := tt.srv.TargetName("secure")
	url := func(cred, query string) string {
		return "iscsi://" + cred + tt.addr + "/" + iqn + "/0" + query
	}
	cases := []struct {
		name string
		url  string
		ok   bool
	}{
		{"one-way CHAP", url("alice%alice-secret-12@", ""), true},
		{"mutual CHAP", url("alice%alice-secret-12@", "?target_user=target-cairn&target_password=target-secret-34"), true},
		{"wrong secret", url("alice%wrong-secret-99@", ""), false},
		{"wrong user", url("mallory%alice-secret-12@", ""), false},
		{"no credentials", url("", ""), false},
		{"target fails mutual check", url("alice%alice-secret-12@", "?target_user=target-cairn&target_password=not-the-target-secret"), false},
		{"open target without CHAP", "iscsi://" + tt.addr + "/" + tt.srv.TargetName("open") + "/0", true},
	}
	for _, c := range cases {
		out, err := testtool.Run(t, 30*time.Second, "iscsi-inq", c.url)
		if c.ok && err != nil {
			t.Errorf("%s: login failed: %v\n%s", c.name, err, out)
		}
		if !c.ok && err == nil {
			t.Errorf("%s: login succeeded, want failure:\n%s", c.name, out)
		}
		if c.ok && err == nil && !strings.Contains(out, "Vendor:CAIRN") {
			t.Errorf("%s: unexpected output:\n%s", c.name, out)
		}
	}
	// Discovery requires its own secret.
	if out, err := testtool.Run(t, 30*time.Second, "iscsi-ls", "iscsi://"+tt.addr); err == nil {
		t.Errorf("discovery without CHAP succeeded:\n%s", out)
	}
	out, err := testtool.Run(t, 30*time.Second, "iscsi-ls", "iscsi://disc%discovery-secret@"+tt.addr)
	if err != nil || !strings.Contains(out, iqn) {
		t.Errorf("discovery with CHAP: %v\n%s", err, out)
	}
}

var iopsRe = regexp.MustCompile(`iops average (\d+)`)

// perfIOPS runs iscsi-perf and returns the final average IOPS.
func perfIOPS(t *testing.T, url string, seconds, qd int) (int, string) {
	t.Helper()
	out, err := testtool.Run(t, time.Duration(seconds+30)*time.Second, "iscsi-perf", "-t", itoa(seconds), "-m", itoa(qd), "-r", url)
	if err != nil {
		t.Fatalf("iscsi-perf QD%d: %v\n%s", qd, err, out)
	}
	m := iopsRe.FindAllStringSubmatch(out, -1)
	if m == nil || !strings.Contains(out, "finished") {
		t.Fatalf("iscsi-perf QD%d did not finish:\n%s", qd, out)
	}
	n, _ := strconv.Atoi(m[len(m)-1][1])
	return n, out
}

// TestSessionOutlivesNOPIntervalsUnderLoad runs iscsi-perf for 20 s at
// queue depth 32 against a backend that adds 1 ms to every IO: libiscsi
// sends a NOP-Out every 5 s and reconnects after three unanswered ones, so
// the run finishing on one session shows NOP-Outs are answered while
// commands are in flight. A short QD1 run beside it shows the pipelining.
func TestSessionOutlivesNOPIntervalsUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("20 s iscsi-perf run")
	}
	testtool.Need(t, "iscsi-perf")
	tt := startTarget(t, nil, map[string]int64{"perf": 64 << 20})
	tt.exports.setLatency(time.Millisecond)
	url := tt.url("perf")
	qd32, out := perfIOPS(t, url, 20, 32)
	if strings.Contains(strings.ToLower(out), "reconnect") {
		t.Errorf("iscsi-perf reconnected during the run:\n%s", out)
	}
	st := tt.srv.Stats()
	if st.NopOuts < 3 {
		t.Errorf("target saw %d NOP-Outs in 20 s, want at least 3 (one per 5 s)", st.NopOuts)
	}
	qd1, _ := perfIOPS(t, url, 3, 1)
	t.Logf("1 ms backend: QD1 %d IOPS, QD32 %d IOPS (%.1fx); NOP-Outs answered: %d", qd1, qd32, float64(qd32)/float64(max(qd1, 1)), st.NopOuts)
}

// TestSessionBufferBoundsMemory: qemu-img writes and then reads back an
// image with 16 requests in flight against a slow backend, through a
// session buffer of 4 MiB; the connection's data buffers (unsolicited,
// solicited and read data until sent) never exceed it, and everything
// completes with the right data.
func TestSessionBufferBoundsMemory(t *testing.T) {
	testtool.Need(t, "qemu-img")
	const budget = 4 << 20
	var mu sync.Mutex
	var peak int64
	tt := startTarget(t, func(c *Config) {
		c.MaxSessionBuffer = budget
		c.FirstBurstLength = 8192
		c.TestingKnobs.OnBufferBytes = func(n int64) {
			mu.Lock()
			peak = max(peak, n)
			mu.Unlock()
		}
	}, map[string]int64{"mem": 16 << 20})
	tt.exports.setLatency(time.Millisecond)
	img := filepath.Join(t.TempDir(), "random.raw")
	data := make([]byte, 14<<20)
	rand.NewChaCha8([32]byte{2}).Read(data)
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	url := tt.url("mem")
	if out, err := testtool.Run(t, 2*time.Minute, "qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", img, url); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	if out, err := testtool.Run(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, url); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
	mu.Lock()
	defer mu.Unlock()
	if peak > budget || peak < 256<<10 {
		t.Fatalf("peak buffer bytes %d, budget %d", peak, budget)
	}
	t.Logf("peak buffer bytes %d of %d", peak, budget)
}
