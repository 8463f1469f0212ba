package mds

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/copysethealth"
)

// metrics is the MDS's Prometheus collector. Gauges are computed from the
// leader's state at scrape time; a follower reports only cairn_mds_leader.
type metrics struct {
	s                 *Server
	segmentsAllocated prometheus.Counter
	// operatorsStarted counts operators queued, by kind and reason;
	// operatorsEnded those that ended, by kind, reason and result (done,
	// moot: the copyset moved on, timed_out).
	operatorsStarted *prometheus.CounterVec
	operatorsEnded   *prometheus.CounterVec
	// movedBytes counts replica bytes filled by add-peer operators.
	movedBytes prometheus.Counter
	// rpcs times the calls the MDS answers.
	rpcs         *prometheus.HistogramVec
	heartbeatAge *prometheus.Desc

	leader       *prometheus.Desc
	chunkServers *prometheus.Desc
	copysets     *prometheus.Desc
	leaders      *prometheus.Desc
	segments     *prometheus.Desc
	volumes      *prometheus.Desc
	capacity     *prometheus.Desc
	allocated    *prometheus.Desc
	operators    *prometheus.Desc
}

func newMetrics(s *Server) *metrics {
	return &metrics{
		s: s,
		segmentsAllocated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_mds_segments_allocated_total", Help: "Segments allocated by this MDS since it started.",
		}),
		operatorsStarted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_mds_operators_started_total", Help: "Operators queued by this MDS, by kind and reason (manual, rebuild, recover, drain, balance-leader, balance-copyset, cleanup).",
		}, []string{"kind", "reason"}),
		operatorsEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_mds_operators_ended_total", Help: "Operators that ended while this MDS led, by kind, reason and result (done, moot, timed_out).",
		}, []string{"kind", "reason", "result"}),
		movedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_mds_replica_bytes_moved_total", Help: "Replica bytes filled by add-peer operators (recover, drain, balance, rebuild) that finished while this MDS led; estimated from the copyset's chunk count.",
		}),
		rpcs: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cairn_mds_rpc_duration_seconds", Help: "Latency of the calls this MDS answered, by method and code (followers answer unavailable).",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2, 16),
		}, []string{"method", "code"}),
		heartbeatAge: prometheus.NewDesc("cairn_mds_chunkserver_heartbeat_age_seconds",
			"Seconds since each chunkserver's last heartbeat to this leader (absent until its first).", []string{"chunkserver"}, nil),
		leader:       prometheus.NewDesc("cairn_mds_leader", "1 when this MDS is the elected leader.", nil, nil),
		chunkServers: prometheus.NewDesc("cairn_mds_chunkservers", "Chunkservers by online state.", []string{"state"}, nil),
		copysets: prometheus.NewDesc("cairn_mds_copysets",
			"Copysets by health, with cairn-ops status's reasons: healthy (none), no_leader, peers_offline, under_replicated, log_gap, installing_snapshot. An unhealthy copyset counts under each of its reasons.",
			[]string{"health"}, nil),
		leaders:   prometheus.NewDesc("cairn_mds_copyset_leaders", "Copysets led by each chunkserver.", []string{"chunkserver"}, nil),
		segments:  prometheus.NewDesc("cairn_mds_segments", "Segments allocated over all volumes.", nil, nil),
		volumes:   prometheus.NewDesc("cairn_mds_volumes", "Volumes by status.", []string{"status"}, nil),
		capacity:  prometheus.NewDesc("cairn_mds_capacity_bytes", "Capacity reported by chunkservers that are not offline: disk_total, disk_free, pool_free (formatted chunk files ready, in chunk bytes), pool_growable (chunk files the pools may still create).", []string{"kind"}, nil),
		allocated: prometheus.NewDesc("cairn_mds_allocated_bytes", "Volume bytes backed by allocated segments (before replication).", nil, nil),
		operators: prometheus.NewDesc("cairn_mds_operators", "Operators waiting for their copyset leader.", nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	m.segmentsAllocated.Describe(ch)
	m.operatorsStarted.Describe(ch)
	m.operatorsEnded.Describe(ch)
	m.movedBytes.Describe(ch)
	m.rpcs.Describe(ch)
	for _, d := range []*prometheus.Desc{m.heartbeatAge, m.leader, m.chunkServers, m.copysets, m.leaders, m.segments, m.volumes, m.capacity, m.allocated, m.operators} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	m.segmentsAllocated.Collect(ch)
	m.operatorsStarted.Collect(ch)
	m.operatorsEnded.Collect(ch)
	m.movedBytes.Collect(ch)
	m.rpcs.Collect(ch)
	l := m.s.leader()
	if l == nil {
		ch <- prometheus.MustNewConstMetric(m.leader, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(m.leader, prometheus.GaugeValue, 1)
	now := time.Now()
	states := map[mdspb.OnlineState]float64{}
	var diskTotal, diskFree, poolFree, poolGrowable float64
	leaders := map[uint64]float64{}
	byHealth := map[string]float64{}
	l.mu.Lock()
	for id, e := range l.mu.chunkServers {
		if !e.lastHB.IsZero() {
			ch <- prometheus.MustNewConstMetric(m.heartbeatAge, prometheus.GaugeValue, now.Sub(e.lastHB).Seconds(), strconv.FormatUint(id, 10))
		}
		st := l.onlineStateLocked(e, now)
		states[st]++
		leaders[id] = 0
		if st != mdspb.OnlineState_ONLINE_STATE_OFFLINE && e.capacity != nil {
			diskTotal += float64(e.capacity.DiskTotalBytes)
			diskFree += float64(e.capacity.DiskFreeBytes)
			poolFree += float64(e.capacity.PoolFreeChunks) * float64(l.consts.ChunkSize)
			poolGrowable += float64(e.capacity.PoolGrowableChunks) * float64(l.consts.ChunkSize)
		}
	}
	for _, c := range l.mu.copysets {
		h := l.copysetHealthLocked(c, now)
		for _, r := range h.reasons {
			byHealth[r]++
		}
		if len(h.reasons) == 0 {
			byHealth[healthHealthy]++
		}
		if c.LeaderId != 0 {
			leaders[c.LeaderId]++
		}
	}
	segments := l.mu.segments
	ops := len(l.mu.operators)
	l.mu.Unlock()
	for _, st := range []mdspb.OnlineState{mdspb.OnlineState_ONLINE_STATE_ONLINE, mdspb.OnlineState_ONLINE_STATE_UNSTABLE,
		mdspb.OnlineState_ONLINE_STATE_OFFLINE, mdspb.OnlineState_ONLINE_STATE_UNKNOWN} {
		ch <- prometheus.MustNewConstMetric(m.chunkServers, prometheus.GaugeValue, states[st], stateLabel(st))
	}
	for _, h := range append([]string{healthHealthy}, copysethealth.Reasons...) {
		ch <- prometheus.MustNewConstMetric(m.copysets, prometheus.GaugeValue, byHealth[h], h)
	}
	for id, n := range leaders {
		ch <- prometheus.MustNewConstMetric(m.leaders, prometheus.GaugeValue, n, strconv.FormatUint(id, 10))
	}
	ch <- prometheus.MustNewConstMetric(m.segments, prometheus.GaugeValue, float64(segments))
	ch <- prometheus.MustNewConstMetric(m.allocated, prometheus.GaugeValue, float64(segments)*float64(l.consts.SegmentSize))
	ch <- prometheus.MustNewConstMetric(m.capacity, prometheus.GaugeValue, diskTotal, "disk_total")
	ch <- prometheus.MustNewConstMetric(m.capacity, prometheus.GaugeValue, diskFree, "disk_free")
	ch <- prometheus.MustNewConstMetric(m.capacity, prometheus.GaugeValue, poolFree, "pool_free")
	ch <- prometheus.MustNewConstMetric(m.capacity, prometheus.GaugeValue, poolGrowable, "pool_growable")
	ch <- prometheus.MustNewConstMetric(m.operators, prometheus.GaugeValue, float64(ops))
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if vols, err := list[mdspb.Volume](ctx, l.st, l.st.k.volumes()); err == nil {
		counts := map[string]float64{"created": 0, "deleting": 0}
		for _, v := range vols {
			if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_DELETING {
				counts["deleting"]++
			} else {
				counts["created"]++
			}
		}
		for k, n := range counts {
			ch <- prometheus.MustNewConstMetric(m.volumes, prometheus.GaugeValue, n, k)
		}
	}
}

func stateLabel(s mdspb.OnlineState) string {
	switch s {
	case mdspb.OnlineState_ONLINE_STATE_ONLINE:
		return "online"
	case mdspb.OnlineState_ONLINE_STATE_UNSTABLE:
		return "unstable"
	case mdspb.OnlineState_ONLINE_STATE_OFFLINE:
		return "offline"
	default:
		return "unknown"
	}
}
