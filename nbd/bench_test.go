package nbd

// Benchmarks of the transmission phase. The latency backend stands in for a replicated volume:
// every read and write takes about a millisecond, as a Raft round trip with an fsync does. With
// requests served one at a time a connection would be capped near 1000 IOPS whatever the client's
// queue depth; the numbers at QD32 show the pipelining.
//
//	go test ./nbd -run '^$' -bench 'QueueDepth' -benchtime 3s

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/internal/testtool"
)

const benchSize = 64 << 20

// benchServer serves one in-memory export named "vol" with the given per-call latency.
func benchServer(b *testing.B, delay time.Duration, multiConn bool) string {
	b.Helper()
	exports := memExports(map[string]int64{"vol": benchSize})
	exports.Device("vol").SetLatency(delay)
	srv, err := NewServer(Config{Exports: exports, Logger: discardLogger(), MultiConn: multiConn})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	b.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// runQueueDepth issues b.N requests of bs bytes at random aligned offsets, keeping qd in flight.
func runQueueDepth(b *testing.B, addr string, write bool, qd, bs int) {
	c := connect(b, addr, "vol", true)
	payload := make([]byte, bs)
	typ, data := cmdRead, []byte(nil)
	if write {
		typ, data = cmdWrite, payload
	}
	slots := make(chan struct{}, qd)
	errs := make(chan error, 1)
	b.SetBytes(int64(bs))
	b.ResetTimer()
	go func() {
		for range b.N {
			r, err := c.recv()
			if err == nil && r.errno != 0 {
				err = fmt.Errorf("%s", errnoName(r.errno))
			}
			if err != nil {
				errs <- err
				return
			}
			<-slots
		}
		errs <- nil
	}()
	blocks := benchSize / bs
	for range b.N {
		slots <- struct{}{}
		c.send(0, typ, uint64(rand.IntN(blocks)*bs), uint32(bs), data)
	}
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "IOPS")
}

// BenchmarkQueueDepth: 4 KiB random IO against a backend with 1 ms latency per call.
func BenchmarkQueueDepth(b *testing.B) {
	addr := benchServer(b, time.Millisecond, false)
	for _, op := range []string{"read", "write"} {
		for _, qd := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("%s/QD%d", op, qd), func(b *testing.B) {
				runQueueDepth(b, addr, op == "write", qd, 4096)
			})
		}
	}
}

// BenchmarkServerOverhead: the same with an instant backend, to show what the server itself costs.
func BenchmarkServerOverhead(b *testing.B) {
	addr := benchServer(b, 0, false)
	for _, op := range []string{"read", "write"} {
		for _, bs := range []int{4096, 1 << 20} {
			b.Run(fmt.Sprintf("%s/bs=%d/QD32", op, bs), func(b *testing.B) {
				runQueueDepth(b, addr, op == "write", 32, bs)
			})
		}
	}
}

// BenchmarkFioQueueDepth runs fio's nbd engine (libnbd) against the 1 ms backend: b.N random
// 4 KiB writes (fio --io_size wraps over the 64 MiB export) at queue depth 1 and 32, reporting
// the IOPS fio measured.
func BenchmarkFioQueueDepth(b *testing.B) {
	testtool.Need(b, "fio")
	addr := benchServer(b, time.Millisecond, false)
	for _, qd := range []int{1, 32} {
		b.Run(fmt.Sprintf("randwrite/QD%d", qd), func(b *testing.B) {
			cmd := exec.Command("fio", fioArgs("nbd://"+addr+"/vol",
				"--rw=randwrite", "--bs=4k", "--iodepth="+strconv.Itoa(qd),
				"--size=64m", "--io_size="+strconv.Itoa(max(b.N, qd)*4096))...)
			cmd.Dir = b.TempDir()
			out, err := cmd.CombinedOutput()
			if err != nil {
				b.Fatalf("fio: %v\n%s", err, out)
			}
			var res struct {
				Jobs []struct {
					Write struct {
						IOPS float64 `json:"iops"`
					} `json:"write"`
				} `json:"jobs"`
			}
			s := string(out)
			if i := strings.IndexByte(s, '{'); i >= 0 {
				s = s[i:]
			}
			if err := json.Unmarshal([]byte(s), &res); err != nil || len(res.Jobs) != 1 {
				b.Fatalf("fio output: %v\n%s", err, out)
			}
			b.ReportMetric(res.Jobs[0].Write.IOPS, "fio-IOPS")
		})
	}
}
