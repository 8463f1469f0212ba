package nbd

// Interoperability tests: the real NBD clients of Debian (libnbd's nbdinfo and nbdcopy, qemu-img,
// qemu-io, fio's nbd engine) against the server running in the test process.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/internal/testtool"
)

// run runs a tool with a deadline and returns its combined output; it fails the test on a non-zero
// exit unless wantFail, and on a zero exit if wantFail.
func run(t *testing.T, wantFail bool, name string, args ...string) string {
	t.Helper()
	out, err := testtool.Run(t, 3*time.Minute, name, args...)
	if wantFail && err == nil {
		t.Fatalf("%s %s: succeeded, want failure\n%s", name, strings.Join(args, " "), out)
	}
	if !wantFail && err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func TestNbdinfo(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	env := newTestEnv(t)
	env.createExport("vol-a", 64<<20, nil)
	env.createExport("vol-b", 1<<20, nil)

	var info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []struct {
			Name         string `json:"export-name"`
			Description  string `json:"description"`
			Size         int64  `json:"export-size"`
			Min          int64  `json:"block_size_minimum"`
			Preferred    int64  `json:"block_size_preferred"`
			Max          int64  `json:"block_size_maximum"`
			ReadOnly     bool   `json:"is_read_only"`
			CanFlush     bool   `json:"can_flush"`
			CanFUA       bool   `json:"can_fua"`
			CanTrim      bool   `json:"can_trim"`
			CanZero      bool   `json:"can_zero"`
			CanDF        bool   `json:"can_df"`
			CanCache     bool   `json:"can_cache"`
			CanMultiConn bool   `json:"can_multi_conn"`
		} `json:"exports"`
	}
	out := run(t, false, "nbdinfo", "--json", env.uri("vol-a"))
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || !info.Structured || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	e := info.Exports[0]
	if e.Name != "vol-a" || e.Size != 64<<20 || e.Min != 512 || e.Preferred != 4096 || e.Max != 32<<20 ||
		e.ReadOnly || !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanDF || e.CanCache || e.CanMultiConn ||
		e.Description != "cairn volume vol-a" {
		t.Fatalf("nbdinfo: %+v\n%s", e, out)
	}

	out = run(t, false, "nbdinfo", "--list", "--json", "nbd://"+env.addr)
	info.Exports = nil
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
	}
	if len(info.Exports) != 2 || info.Exports[0].Name != "vol-a" || info.Exports[1].Name != "vol-b" ||
		info.Exports[0].Size != 64<<20 || info.Exports[1].Size != 1<<20 {
		t.Fatalf("nbdinfo --list: %s", out)
	}
	if out := run(t, false, "nbdinfo", "--size", env.uri("vol-b")); strings.TrimSpace(out) != "1048576" {
		t.Fatalf("nbdinfo --size: %q", out)
	}
}

func TestToolsUnknownExport(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	testtool.Need(t, "qemu-img")
	env := newTestEnv(t)
	env.createExport("vol", 1<<20, nil)
	// libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
	out := run(t, true, "nbdinfo", env.uri("missing"))
	if !strings.Contains(out, "No such file or directory for export: missing") {
		t.Fatalf("nbdinfo on a missing export: %s", out)
	}
	out = run(t, true, "qemu-img", "info", env.uri("missing"))
	if !strings.Contains(out, "unknown export") {
		t.Fatalf("qemu-img on a missing export: %s", out)
	}
}

func TestToolsUnavailableExport(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	testtool.Need(t, "qemu-img")
	env := newTestEnv(t)
	env.createExport("vol", 1<<20, nil)
	env.exports.OnOpen(func(context.Context, string) error {
		return fmt.Errorf("%w: metadata server unreachable", blockdev.ErrUnavailable)
	})
	// Neither tool may say the export does not exist.
	out := run(t, true, "nbdinfo", env.uri("vol"))
	if strings.Contains(out, "No such file") || strings.Contains(out, "unknown export") {
		t.Fatalf("nbdinfo on an unavailable export: %s", out)
	}
	out = run(t, true, "qemu-img", "info", env.uri("vol"))
	if strings.Contains(out, "unknown export") || !strings.Contains(out, "metadata server unreachable") {
		t.Fatalf("qemu-img on an unavailable export: %s", out)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	testtool.Need(t, "nbdcopy")
	const size = 64 << 20
	for _, multiConn := range []bool{false, true} {
		name := "single-connection"
		if multiConn {
			name = "multi-conn"
		}
		t.Run(name, func(t *testing.T) {
			env := newTestEnv(t, func(c *Config) { c.MultiConn = multiConn })
			vol := env.createExport("vol", size, nil)
			src := filepath.Join(t.TempDir(), "src.raw")
			want := testtool.RandomFile(t, src, size)
			run(t, false, "nbdcopy", "--flush", src, env.uri("vol"))
			if !bytes.Equal(readFile(t, vol), want) {
				t.Fatal("export differs from the source after nbdcopy in")
			}
			out := filepath.Join(t.TempDir(), "out.raw")
			run(t, false, "nbdcopy", env.uri("vol"), out)
			if !bytes.Equal(readFile(t, out), want) {
				t.Fatal("copy out differs from the source")
			}
		})
	}
}

func TestQemuImgConvertCompare(t *testing.T) {
	testtool.Need(t, "qemu-img")
	const size = 32 << 20
	env := newTestEnv(t)
	vol := env.createExport("vol", size, nil)
	src := filepath.Join(t.TempDir(), "src.raw")
	want := testtool.RandomFile(t, src, size)

	run(t, false, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, env.uri("vol"))
	run(t, false, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, env.uri("vol"))
	if !bytes.Equal(readFile(t, vol), want) {
		t.Fatal("export differs from the source")
	}
	// compare notices a difference: the check above is not vacuous.
	f, err := os.OpenFile(vol, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{want[size-1000] ^ 0xff}, size-1000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out := run(t, true, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, env.uri("vol"))
	if !strings.Contains(out, "mismatch") {
		t.Fatalf("qemu-img compare: %s", out)
	}
	if out := run(t, false, "qemu-img", "info", "--output=json", env.uri("vol")); !strings.Contains(out, `"virtual-size": 33554432`) {
		t.Fatalf("qemu-img info: %s", out)
	}
}

// TestQemuIoTrimAndWriteZeroes drives TRIM and WRITE_ZEROES (with and without NO_HOLE) from
// qemu-io, reads zeros back through NBD, and checks on the backing file which ranges were
// unmapped (holes) and which were provisioned.
func TestQemuIoTrimAndWriteZeroes(t *testing.T) {
	testtool.Need(t, "qemu-io")
	env := newTestEnv(t)
	vol := env.createExport("vol", 8<<20, nil)
	uri := env.uri("vol")
	run(t, false, "qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 8M", "-c", "flush")

	run(t, false, "qemu-io", "-f", "raw", uri,
		"-c", "discard 1M 1M", // NBD_CMD_TRIM
		"-c", "write -z -u 3M 1M", // NBD_CMD_WRITE_ZEROES, may unmap
		"-c", "write -z 5M 1M", // NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE
		"-c", "write -z -f 7M 512k", // with FUA
		"-c", "flush",
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0 1M 1M",
		"-c", "read -P 0xab 2M 1M",
		"-c", "read -P 0 3M 1M",
		"-c", "read -P 0xab 4M 1M",
		"-c", "read -P 0 5M 1M",
		"-c", "read -P 0xab 6M 1M",
		"-c", "read -P 0 7M 512k",
		"-c", "read -P 0xab 7680k 512k",
	)
	// The check that reads fail on a wrong pattern: qemu-io's exit status is meaningful.
	run(t, true, "qemu-io", "-f", "raw", uri, "-c", "read -P 0xab 1M 4k")

	b := readFile(t, vol)
	for _, r := range []struct {
		off, n int
		val    byte
	}{{0, 1 << 20, 0xab}, {1 << 20, 1 << 20, 0}, {2 << 20, 1 << 20, 0xab}, {3 << 20, 1 << 20, 0}, {5 << 20, 1 << 20, 0}, {7 << 20, 512 << 10, 0}} {
		if !bytes.Equal(b[r.off:r.off+r.n], bytes.Repeat([]byte{r.val}, r.n)) {
			t.Fatalf("backing file at %d: want %#x", r.off, r.val)
		}
	}
	f, err := os.Open(vol)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	isHole := func(off int64) bool {
		next, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			t.Fatalf("SEEK_DATA %d: %v", off, err)
		}
		return next > off
	}
	if !isHole(1<<20) || !isHole(3<<20) {
		t.Fatal("TRIM and WRITE_ZEROES without NO_HOLE did not unmap")
	}
	if isHole(5 << 20) {
		t.Fatal("WRITE_ZEROES with NO_HOLE left a hole")
	}
}

func fioArgs(uri string, extra ...string) []string {
	return append([]string{
		"--name=nbd", "--ioengine=nbd", "--uri=" + uri, "--output-format=json", "--verify_state_save=0",
	}, extra...)
}

// fioVerify runs a 4 KiB random write at queue depth 32 over size bytes, then reads everything
// back checking CRC32C headers fio put in each block.
func fioVerify(t *testing.T, uri string, size string, wantFail bool) string {
	return run(t, wantFail, "fio", fioArgs(uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size="+size,
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_backlog=0",
	)...)
}

func TestFioVerify(t *testing.T) {
	testtool.Need(t, "fio")
	env := newTestEnv(t)
	env.createExport("vol", 32<<20, nil)
	out := fioVerify(t, env.uri("vol"), "16m", false)
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if i := strings.IndexByte(out, '{'); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	if len(res.Jobs) != 1 || res.Jobs[0].Error != 0 || res.Jobs[0].Write.IOBytes != 16<<20 || res.Jobs[0].Read.IOBytes != 16<<20 {
		t.Fatalf("fio: %+v", res)
	}
	// Counters are updated after each reply; the connection ends only
	// after every request has finished.
	soon.True(t, 20*time.Second, "fio's connection closed", func() bool { return env.srv.Stats().Connections == 0 })
	st := env.srv.Stats()
	if st.WritesTotal != 4096 || st.ReadsTotal < 4096 {
		t.Fatalf("server saw %d writes and %d reads", st.WritesTotal, st.ReadsTotal)
	}
}

// TestFioVerifyCatchesCorruption: the same fio job fails when the backend returns one wrong byte,
// so TestFioVerify passing means the data was right.
func TestFioVerifyCatchesCorruption(t *testing.T) {
	testtool.Need(t, "fio")
	env := newTestEnv(t)
	env.createExport("vol", 32<<20, nil)
	env.device("vol").SetReadFilter(corrupt)
	fioVerify(t, env.uri("vol"), "4m", true)
}

// corrupt flips one byte of every read that covers offset 1 MiB + 100.
func corrupt(off int64, p []byte) {
	const bad = 1<<20 + 100
	if off <= bad && bad < off+int64(len(p)) {
		p[bad-off] ^= 0x01
	}
}

// TestToolsMapAndSparseCopy: nbdinfo --map shows what an export holds, and
// nbdcopy reads only that (base:allocation, NBD_CMD_BLOCK_STATUS).
func TestToolsMapAndSparseCopy(t *testing.T) {
	testtool.Need(t, "nbdinfo")
	testtool.Need(t, "nbdcopy")
	const size = 64 << 20
	env := newTestEnv(t)
	path := env.createExport("sparse", size, nil)
	data := bytes.Repeat([]byte{0xa5}, 128<<10)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 32 << 20} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()

	out := run(t, false, "nbdinfo", "--map", "--json", env.uri("sparse"))
	var extents []struct {
		Offset, Length int64
		Type           int
	}
	if err := json.Unmarshal([]byte(out), &extents); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	type ext struct {
		off, n int64
		hole   bool
	}
	var got []ext
	for _, e := range extents {
		got = append(got, ext{e.Offset, e.Length, e.Type == 3})
	}
	want := []ext{{0, 128 << 10, false}, {128 << 10, 32<<20 - 128<<10, true}, {32 << 20, 128 << 10, false}, {32<<20 + 128<<10, 32<<20 - 128<<10, true}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("map:\n got %v\nwant %v\n%s", got, want, out)
	}

	dst := filepath.Join(t.TempDir(), "copy.raw")
	dev := env.device("sparse")
	before := dev.Bytes(blockdevtest.OpRead)
	run(t, false, "nbdcopy", env.uri("sparse"), dst)
	if read := dev.Bytes(blockdevtest.OpRead) - before; read > 1<<20 {
		t.Fatalf("nbdcopy read %d bytes of a %d-byte export holding 256 KiB", read, size)
	}
	copied, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(copied) != size || !bytes.Equal(copied[:128<<10], data) || !bytes.Equal(copied[32<<20:32<<20+128<<10], data) ||
		slices.ContainsFunc(copied[128<<10:32<<20], func(b byte) bool { return b != 0 }) {
		t.Fatal("the sparse copy differs from the export")
	}
}
