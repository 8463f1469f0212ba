package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"cairn.io/cairn/client"
	"cairn.io/cairn/internal/httpdebug"
	"cairn.io/cairn/nbd"
)

// metrics is the gateway's Prometheus registry and its own instruments; the
// frontends' counters are read from their Stats at scrape time.
type metrics struct {
	g   *Gateway
	reg *prometheus.Registry

	nbdLatency *prometheus.HistogramVec
	volumes    *volumeMetrics
	opens      prometheus.Counter
	openErrors prometheus.Counter
	closes     prometheus.Counter
	fenced     prometheus.Counter
	pollErrors prometheus.Counter
	exported   prometheus.Gauge

	mu struct {
		sync.Mutex
		lastOK  time.Time // last successful volume list
		lastErr error     // last failed one, if after lastOK
	}
}

func newMetrics(g *Gateway) *metrics {
	m := &metrics{g: g, reg: prometheus.NewRegistry()}
	m.nbdLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "cairn_gateway_nbd_request_duration_seconds",
		Help:    "Time from the arrival of an NBD request to its reply, by command.",
		Buckets: prometheus.ExponentialBuckets(50e-6, 2, 18), // 50 µs .. 6.5 s
	}, []string{"command"})
	m.opens = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cairn_gateway_volume_opens_total", Help: "Volumes opened (each open fences earlier writers)."})
	m.openErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cairn_gateway_volume_open_errors_total", Help: "Volume opens that failed, unknown volumes included."})
	m.closes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cairn_gateway_volume_closes_total", Help: "Volumes closed after their last user left."})
	m.fenced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cairn_gateway_volumes_fenced_total", Help: "Open volumes found fenced by a newer writer."})
	m.pollErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cairn_gateway_mds_poll_errors_total", Help: "Failed reads of the MDS's volume list."})
	m.exported = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cairn_gateway_volumes_exported", Help: "Volumes the last MDS poll listed for export."})
	m.reg.MustRegister(m.nbdLatency, m.opens, m.openErrors, m.closes, m.fenced, m.pollErrors, m.exported,
		statsCollector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.volumes = newVolumeMetrics(m.reg)
	return m
}

func (m *metrics) observeNBD(ev nbd.RequestEvent) {
	m.nbdLatency.WithLabelValues(ev.Command).Observe(ev.Duration.Seconds())
}

func (m *metrics) pollOK(exported int) {
	m.exported.Set(float64(exported))
	m.mu.Lock()
	m.mu.lastOK, m.mu.lastErr = time.Now(), nil
	m.mu.Unlock()
}

func (m *metrics) pollFailed(err error) {
	m.pollErrors.Inc()
	m.mu.Lock()
	m.mu.lastErr = err
	m.mu.Unlock()
}

// polledSince tells whether a poll of the MDS's volume list succeeded after t.
func (m *metrics) polledSince(t time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.mu.lastOK.After(t)
}

// health says whether the gateway is serving with a reachable MDS.
func (m *metrics) health(context.Context) (string, error) {
	g := m.g
	g.mu.Lock()
	stopped := g.mu.stopped
	g.mu.Unlock()
	if stopped {
		return "", errors.New("stopping")
	}
	m.mu.Lock()
	lastOK, lastErr := m.mu.lastOK, m.mu.lastErr
	m.mu.Unlock()
	stale := 3 * g.cfg.PollInterval
	switch {
	case lastOK.IsZero() && lastErr != nil:
		return "", fmt.Errorf("MDS not reached yet: %v", lastErr)
	case lastOK.IsZero():
		return "", errors.New("MDS not reached yet")
	case lastErr != nil && time.Since(lastOK) > stale:
		return "", fmt.Errorf("MDS unreachable for %s: %v", time.Since(lastOK).Round(time.Second), lastErr)
	}
	open := g.vols.snapshot()
	names := make([]string, 0, len(open))
	for n, users := range open {
		names = append(names, fmt.Sprintf("%s(%d)", n, users))
	}
	sort.Strings(names)
	return fmt.Sprintf("ok nbd=%s iscsi=%s open=[%s]", orNone(g.NBDAddr()), orNone(g.ISCSIAddr()), strings.Join(names, " ")), nil
}

func orNone(s string) string {
	if s == "" {
		return "off"
	}
	return s
}

func (m *metrics) handler() http.Handler { return httpdebug.Handler(m.reg, m.health) }

// statsCollector turns the NBD and iSCSI servers' counters and the open
// volumes into metrics at scrape time.
type statsCollector struct{ m *metrics }

var (
	descNBDConns        = prometheus.NewDesc("cairn_gateway_nbd_connections", "NBD connections open now.", nil, nil)
	descNBDConnsTotal   = prometheus.NewDesc("cairn_gateway_nbd_connections_total", "NBD connections accepted.", nil, nil)
	descNBDHandshakes   = prometheus.NewDesc("cairn_gateway_nbd_handshakes_failed_total", "NBD connections that ended before transmission for a reason other than the client's choice.", nil, nil)
	descNBDProtoErrs    = prometheus.NewDesc("cairn_gateway_nbd_protocol_errors_total", "NBD connections dropped for a protocol violation.", nil, nil)
	descNBDInFlight     = prometheus.NewDesc("cairn_gateway_nbd_requests_in_flight", "NBD requests running now.", nil, nil)
	descNBDRequests     = prometheus.NewDesc("cairn_gateway_nbd_requests_total", "NBD requests executed, by command.", []string{"command"}, nil)
	descNBDBytes        = prometheus.NewDesc("cairn_gateway_nbd_bytes_total", "NBD payload bytes, by direction.", []string{"direction"}, nil)
	descNBDReqErrs      = prometheus.NewDesc("cairn_gateway_nbd_request_errors_total", "NBD requests answered with an error.", nil, nil)
	descNBDInline       = prometheus.NewDesc("cairn_gateway_nbd_inline_reads_total", "NBD reads run on the goroutine that read them (they arrived alone).", nil, nil)
	descISCSISessions   = prometheus.NewDesc("cairn_gateway_iscsi_sessions", "iSCSI sessions logged in now.", nil, nil)
	descISCSICommands   = prometheus.NewDesc("cairn_gateway_iscsi_commands_total", "SCSI commands executed.", nil, nil)
	descISCSINopOuts    = prometheus.NewDesc("cairn_gateway_iscsi_nop_outs_total", "NOP-Outs received from initiators.", nil, nil)
	descISCSIPings      = prometheus.NewDesc("cairn_gateway_iscsi_pings_total", "NOP-In pings sent to idle initiators.", nil, nil)
	descISCSIDead       = prometheus.NewDesc("cairn_gateway_iscsi_dead_initiators_total", "Connections dropped because the initiator did not answer a ping.", nil, nil)
	descVolumesOpen     = prometheus.NewDesc("cairn_gateway_volumes_open", "Volumes the gateway holds open (lingering ones included).", nil, nil)
	descVolumeUsers     = prometheus.NewDesc("cairn_gateway_volume_users", "Users (NBD connections, iSCSI targets in use) of each open volume.", []string{"volume"}, nil)
	descClientChunkReqs = prometheus.NewDesc("cairn_gateway_client_chunk_requests_total", "Chunk requests the client library sent for an open volume (since it was opened).", []string{"volume"}, nil)
	descClientRetries   = prometheus.NewDesc("cairn_gateway_client_retries_total", "Chunk requests the client library retried (leader changes, restarts, overload).", []string{"volume"}, nil)
	descClientRedirects = prometheus.NewDesc("cairn_gateway_client_redirects_total", "REDIRECTED answers the client library followed.", []string{"volume"}, nil)
	descClientErrors    = prometheus.NewDesc("cairn_gateway_client_errors_total", "IOs the client library failed.", []string{"volume"}, nil)
	descClientSegments  = prometheus.NewDesc("cairn_gateway_client_segments_allocated_total", "Segments the client library allocated at the MDS.", []string{"volume"}, nil)
	descMDSLastPollAge  = prometheus.NewDesc("cairn_gateway_mds_last_poll_age_seconds", "Seconds since the MDS's volume list was last read successfully (-1: never).", nil, nil)
)

func (c statsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descNBDConns, descNBDConnsTotal, descNBDHandshakes, descNBDProtoErrs,
		descNBDInFlight, descNBDRequests, descNBDBytes, descNBDReqErrs, descNBDInline, descISCSISessions, descISCSICommands,
		descISCSINopOuts, descISCSIPings, descISCSIDead, descVolumesOpen, descVolumeUsers, descMDSLastPollAge,
		descClientChunkReqs, descClientRetries, descClientRedirects, descClientErrors, descClientSegments} {
		ch <- d
	}
}

func (c statsCollector) Collect(ch chan<- prometheus.Metric) {
	g := c.m.g
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	if g.nbd != nil {
		s := g.nbd.Stats()
		gauge(descNBDConns, float64(s.Connections))
		counter(descNBDConnsTotal, s.ConnectionsTotal)
		counter(descNBDHandshakes, s.HandshakesFailedTotal)
		counter(descNBDProtoErrs, s.ProtocolErrorsTotal)
		gauge(descNBDInFlight, float64(s.InFlight))
		counter(descNBDRequests, s.ReadsTotal, "read")
		counter(descNBDRequests, s.WritesTotal, "write")
		counter(descNBDRequests, s.FlushesTotal, "flush")
		counter(descNBDRequests, s.TrimsTotal, "trim")
		counter(descNBDRequests, s.WriteZeroesTotal, "write_zeroes")
		counter(descNBDBytes, s.ReadBytesTotal, "read")
		counter(descNBDBytes, s.WrittenBytesTotal, "write")
		counter(descNBDReqErrs, s.RequestErrorsTotal)
		counter(descNBDInline, s.InlineTotal)
	}
	if g.iscsi != nil {
		s := g.iscsi.Stats()
		gauge(descISCSISessions, float64(s.Sessions))
		counter(descISCSICommands, s.Commands)
		counter(descISCSINopOuts, s.NopOuts)
		counter(descISCSIPings, s.Pings)
		counter(descISCSIDead, s.DeadInitiators)
	}
	open := g.vols.snapshot()
	gauge(descVolumesOpen, float64(len(open)))
	for name, users := range open {
		gauge(descVolumeUsers, float64(users), name)
	}
	for _, e := range g.vols.openEntries() {
		cv, ok := e.vol.(interface{ Stats() client.Stats })
		if !ok {
			continue
		}
		s := cv.Stats()
		counter(descClientChunkReqs, s.ChunkRequests, e.name)
		counter(descClientRetries, s.Retries, e.name)
		counter(descClientRedirects, s.Redirects, e.name)
		counter(descClientErrors, s.Errors, e.name)
		counter(descClientSegments, s.SegmentsAllocated, e.name)
	}
	c.m.mu.Lock()
	lastOK := c.m.mu.lastOK
	c.m.mu.Unlock()
	age := -1.0
	if !lastOK.IsZero() {
		age = time.Since(lastOK).Seconds()
	}
	gauge(descMDSLastPollAge, age)
}
