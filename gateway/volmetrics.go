package gateway

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// volumeMetrics are the IO figures of each open volume, by operation
// (read, write, unmap, flush), whichever frontend the IO came through. A
// volume's series go when the gateway closes it, so their number is bounded
// by the volumes open.
type volumeMetrics struct {
	latency *prometheus.HistogramVec
	bytes   *prometheus.CounterVec
	errors  *prometheus.CounterVec
}

func newVolumeMetrics(reg *prometheus.Registry) *volumeMetrics {
	v := &volumeMetrics{
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cairn_gateway_volume_op_duration_seconds",
			Help:    "Latency of IO on each open volume, by operation; its count is the operations done (IOPS as a rate).",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18), // 50 µs .. 6.5 s
		}, []string{"volume", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_gateway_volume_bytes_total", Help: "Bytes read and written on each open volume.",
		}, []string{"volume", "op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_gateway_volume_errors_total", Help: "IO on each open volume that failed, by operation.",
		}, []string{"volume", "op"}),
	}
	reg.MustRegister(v.latency, v.bytes, v.errors)
	return v
}

// volumeOps are the operations counted per volume.
var volumeOps = []string{"read", "write", "unmap", "flush"}

// start makes a newly opened volume's series appear at zero, so that rates
// and alerts see it before its first IO or error.
func (v *volumeMetrics) start(volume string) {
	for _, op := range volumeOps {
		v.latency.WithLabelValues(volume, op)
		v.bytes.WithLabelValues(volume, op)
		v.errors.WithLabelValues(volume, op)
	}
}

// observe records one operation on a volume.
func (v *volumeMetrics) observe(volume, op string, n int, start time.Time, err error) {
	v.latency.WithLabelValues(volume, op).Observe(time.Since(start).Seconds())
	if n > 0 {
		v.bytes.WithLabelValues(volume, op).Add(float64(n))
	}
	if err != nil && !isCancel(err) {
		v.errors.WithLabelValues(volume, op).Inc()
	}
}

// forget drops a closed volume's series.
func (v *volumeMetrics) forget(volume string) {
	l := prometheus.Labels{"volume": volume}
	v.latency.DeletePartialMatch(l)
	v.bytes.DeletePartialMatch(l)
	v.errors.DeletePartialMatch(l)
}

func isCancel(err error) bool {
	return err == context.Canceled || err == context.DeadlineExceeded
}
