package ops

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/spf13/cobra"
)

// top: live per-volume IO (rbd perf image iostat's), from the gateways'
// per-volume metrics: two scrapes of /metrics an interval apart give each
// open volume's IOPS, MiB/s and mean latency by operation.

// volumeIOMetric and friends are the gateway's per-volume series
// (gateway/volmetrics.go).
const (
	volumeLatencyMetric = "cairn_gateway_volume_op_duration_seconds"
	volumeBytesMetric   = "cairn_gateway_volume_bytes_total"
	volumeErrorsMetric  = "cairn_gateway_volume_errors_total"
)

// ioCounters are one volume's counters at one scrape, by operation.
type ioCounters struct {
	count, sum, bytes, errors map[string]float64
}

// volumeKey names a volume on a gateway.
type volumeKey struct{ gateway, volume string }

// scrapeVolumes reads one gateway's per-volume counters.
func scrapeVolumes(ctx context.Context, addr string) (map[volumeKey]*ioCounters, error) {
	url := addr
	if !strings.Contains(url, "://") {
		url = "http://" + addr
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(url, "/")+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("gateway metrics %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("gateway metrics %s: %s", addr, resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("gateway metrics %s: %w", addr, err)
	}
	out := map[volumeKey]*ioCounters{}
	get := func(m *dto.Metric) (*ioCounters, string) {
		var vol, op string
		for _, l := range m.GetLabel() {
			switch l.GetName() {
			case "volume":
				vol = l.GetValue()
			case "op":
				op = l.GetValue()
			}
		}
		k := volumeKey{addr, vol}
		c := out[k]
		if c == nil {
			c = &ioCounters{count: map[string]float64{}, sum: map[string]float64{}, bytes: map[string]float64{}, errors: map[string]float64{}}
			out[k] = c
		}
		return c, op
	}
	for _, m := range families[volumeLatencyMetric].GetMetric() {
		c, op := get(m)
		c.count[op], c.sum[op] = float64(m.GetHistogram().GetSampleCount()), m.GetHistogram().GetSampleSum()
	}
	for _, m := range families[volumeBytesMetric].GetMetric() {
		c, op := get(m)
		c.bytes[op] = m.GetCounter().GetValue()
	}
	for _, m := range families[volumeErrorsMetric].GetMetric() {
		c, op := get(m)
		c.errors[op] = m.GetCounter().GetValue()
	}
	if len(out) == 0 && families[volumeLatencyMetric] == nil {
		return nil, fmt.Errorf("gateway metrics %s: no %s series (is it a gateway's metrics address?)", addr, volumeLatencyMetric)
	}
	return out, nil
}

type volumeIO struct {
	Volume  string `json:"volume"`
	Gateway string `json:"gateway"`
	// Per second over the interval, and mean latencies in milliseconds.
	ReadIOPS      float64 `json:"read_iops"`
	WriteIOPS     float64 `json:"write_iops"`
	ReadMiBps     float64 `json:"read_mib_per_s"`
	WriteMiBps    float64 `json:"write_mib_per_s"`
	ReadLatencyMs float64 `json:"read_latency_ms"`
	WriteLatMs    float64 `json:"write_latency_ms"`
	ErrorsPerSec  float64 `json:"errors_per_s"`
}

type topSample struct {
	IntervalSeconds float64    `json:"interval_seconds"`
	Volumes         []volumeIO `json:"volumes"`
}

func (s *topSample) writeTable(t *table) {
	t.row("VOLUME", "GATEWAY", "READ IOPS", "WRITE IOPS", "READ MiB/s", "WRITE MiB/s", "READ LAT", "WRITE LAT", "ERRORS/s")
	for _, v := range s.Volumes {
		t.row(v.Volume, v.Gateway, fmt.Sprintf("%.0f", v.ReadIOPS), fmt.Sprintf("%.0f", v.WriteIOPS),
			fmt.Sprintf("%.1f", v.ReadMiBps), fmt.Sprintf("%.1f", v.WriteMiBps),
			fmt.Sprintf("%.2f ms", v.ReadLatencyMs), fmt.Sprintf("%.2f ms", v.WriteLatMs), fmt.Sprintf("%.1f", v.ErrorsPerSec))
	}
}

// rates turns two scrapes dt apart into per-volume figures, busiest first.
func rates(before, after map[volumeKey]*ioCounters, dt float64) []volumeIO {
	var out []volumeIO
	for k, a := range after {
		b := before[k]
		if b == nil {
			continue // opened meanwhile: next time
		}
		d := func(m func(*ioCounters) map[string]float64, op string) float64 { return max(m(a)[op]-m(b)[op], 0) }
		count := func(c *ioCounters) map[string]float64 { return c.count }
		sum := func(c *ioCounters) map[string]float64 { return c.sum }
		bytes := func(c *ioCounters) map[string]float64 { return c.bytes }
		errs := func(c *ioCounters) map[string]float64 { return c.errors }
		lat := func(op string) float64 {
			if n := d(count, op); n > 0 {
				return d(sum, op) / n * 1000
			}
			return 0
		}
		var e float64
		for op := range a.errors {
			e += d(errs, op)
		}
		out = append(out, volumeIO{
			Volume: k.volume, Gateway: k.gateway,
			ReadIOPS: d(count, "read") / dt, WriteIOPS: d(count, "write") / dt,
			ReadMiBps: d(bytes, "read") / dt / (1 << 20), WriteMiBps: d(bytes, "write") / dt / (1 << 20),
			ReadLatencyMs: lat("read"), WriteLatMs: lat("write"), ErrorsPerSec: e / dt,
		})
	}
	slices.SortFunc(out, func(x, y volumeIO) int {
		if c := -cmpFloat(x.ReadIOPS+x.WriteIOPS, y.ReadIOPS+y.WriteIOPS); c != 0 {
			return c
		}
		return strings.Compare(x.Volume+x.Gateway, y.Volume+y.Gateway)
	})
	return out
}

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (a *app) topCommand() *cobra.Command {
	var gateways []string
	var interval time.Duration
	var count int
	cmd := &cobra.Command{
		Use:   "top --gateway ADDR [--interval D] [--count N]",
		Short: "Show live IO of each open volume: IOPS, MiB/s and latency, from the gateways' metrics",
		Long: `top reads the per-volume IO metrics of the gateways named by --gateway (their
metrics addresses, as --metrics-addr of cairn-gateway) twice, --interval apart,
and shows for each open volume its read and write IOPS, MiB/s and mean latency,
busiest first; --count N repeats it N times (0: until interrupted).`,
		Args: exactArgs(0, "none"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error {
			if len(gateways) == 0 {
				return usageError(fmt.Errorf("--gateway is required: a gateway's metrics address"))
			}
			if interval < 100*time.Millisecond {
				return usageError(fmt.Errorf("--interval %v: at least 100ms", interval))
			}
			scrape := func() (map[volumeKey]*ioCounters, time.Time, error) {
				all := map[volumeKey]*ioCounters{}
				at := time.Now()
				for _, g := range gateways {
					cctx, cancel := a.callCtx(ctx)
					got, err := scrapeVolumes(cctx, g)
					cancel()
					if err != nil {
						return nil, at, unreachable(err)
					}
					for k, v := range got {
						all[k] = v
					}
				}
				return all, at, nil
			}
			before, t0, err := scrape()
			if err != nil {
				return err
			}
			for i := 0; count == 0 || i < count; i++ {
				if err := sleepCtx(ctx, interval); err != nil {
					return err
				}
				after, t1, err := scrape()
				if err != nil {
					return err
				}
				dt := t1.Sub(t0).Seconds()
				sample := &topSample{IntervalSeconds: dt, Volumes: rates(before, after, dt)}
				if sample.Volumes == nil {
					sample.Volumes = []volumeIO{}
				}
				if err := a.emit(sample); err != nil {
					return err
				}
				before, t0 = after, t1
			}
			return nil
		}),
	}
	cmd.Flags().StringSliceVar(&gateways, "gateway", nil, "a gateway's metrics address (host:port), repeated or comma-separated")
	cmd.Flags().DurationVar(&interval, "interval", 2*time.Second, "time between the scrapes a sample compares")
	cmd.Flags().IntVar(&count, "count", 1, "samples to show (0: until interrupted)")
	return cmd
}
