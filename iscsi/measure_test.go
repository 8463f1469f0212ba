package iscsi

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/internal/testtool"
)

var qemuBenchRe = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)

// TestMeasureThroughput prints the figures quoted in docs/iscsi.md:
// qemu-img bench (4 KiB writes, queue depth 32) and iscsi-perf (4 KiB random
// reads at queue depth 1 and 32) against the file backend and against the
// same backend with 1 ms added to every IO. It asserts nothing about speed;
// run it with CAIRN_ISCSI_MEASURE=1.
func TestMeasureThroughput(t *testing.T) {
	if os.Getenv("CAIRN_ISCSI_MEASURE") == "" {
		t.Skip("set CAIRN_ISCSI_MEASURE=1 to measure throughput")
	}
	testtool.Need(t, "qemu-img")
	testtool.Need(t, "iscsi-perf")
	var rows []string
	for _, latency := range []time.Duration{0, time.Millisecond} {
		tt := startTarget(t, nil, map[string]int64{"bench": 256 << 20})
		tt.exports.setLatency(latency)
		url := tt.url("bench")
		backend := "file"
		if latency > 0 {
			backend = "file + 1 ms"
		}
		for _, qd := range []int{1, 32} {
			count := 20000
			if latency > 0 && qd == 1 {
				count = 2000
			}
			args := []string{"bench", "-w", "-d", itoa(qd), "-c", itoa(count), "-s", "4k", "-f", "raw", url}
			out, err := testtool.Run(t, 5*time.Minute, "qemu-img", args...)
			if err != nil {
				t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
			}
			m := qemuBenchRe.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("qemu-img bench output:\n%s", out)
			}
			var secs float64
			fmt.Sscan(m[1], &secs)
			rows = append(rows, fmt.Sprintf("| %s | qemu-img bench -w -d %d -c %d -s 4k | %.0f IOPS |", backend, qd, count, float64(count)/secs))
		}
		for _, qd := range []int{1, 32} {
			iops, _ := perfIOPS(t, url, 10, qd)
			rows = append(rows, fmt.Sprintf("| %s | iscsi-perf -r -m %d -t 10 (4 KiB reads) | %d IOPS |", backend, qd, iops))
		}
	}
	t.Logf("\n| backend | command | result |\n|---|---|---|\n%s", strings.Join(rows, "\n"))
}
