package chunkserver

import (
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/copyset"
	"cairn.io/cairn/copyset/wal"
)

// metrics are the chunkserver's Prometheus metrics, on a registry of its own
// so that several chunkservers can run in one process (tests).
type metrics struct {
	requests   *prometheus.CounterVec
	bytes      *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	walSync    prometheus.Histogram
	walEntries prometheus.Histogram
	walBatch   prometheus.Histogram
	walInline  prometheus.Counter
	commit     prometheus.Histogram
	apply      prometheus.Histogram
	copysets   prometheus.Gauge
	leaders    prometheus.Gauge
	reg        *prometheus.Registry
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		reg: reg,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_chunkserver_requests_total", Help: "Chunk requests by operation and status.",
		}, []string{"op", "status"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_chunkserver_request_bytes_total", Help: "Chunk data bytes of the requests that succeeded, by operation: read (returned), write (written, a clone's fill included).",
		}, []string{"op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cairn_chunkserver_request_duration_seconds", Help: "Chunk request latency by operation.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
		}, []string{"op"}),
		walSync: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cairn_chunkserver_wal_fsync_duration_seconds", Help: "Latency of the shared WAL's fdatasync.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
		}),
		walEntries: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cairn_chunkserver_wal_entries_per_fsync", Help: "Raft entries made durable by one WAL fdatasync (group commit).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12),
		}),
		walInline: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_chunkserver_wal_inline_commits_total",
			Help: "WAL commits of a lone append to an idle log (a follower's) written by the goroutine that received it, not by the WAL's writer.",
		}),
		walBatch: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cairn_chunkserver_wal_copysets_per_fsync", Help: "Copyset submissions in one WAL fdatasync.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12),
		}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cairn_chunkserver_proposal_commit_duration_seconds", Help: "From a write's or delete's proposal on its leader to its commit: the wait for the Raft worker, replication and the quorum's WAL fdatasyncs.",
			Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
		}),
		apply: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "cairn_chunkserver_proposal_apply_duration_seconds", Help: "From a write's or delete's commit on its leader to its apply: the apply queue and the write into the chunk files.",
			Buckets: prometheus.ExponentialBuckets(5e-6, 2, 16),
		}),
		copysets: prometheus.NewGauge(prometheus.GaugeOpts{Name: "cairn_chunkserver_copysets", Help: "Copysets hosted."}),
		leaders:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "cairn_chunkserver_leaders", Help: "Copysets this chunkserver leads."}),
	}
	// Both series exist from the start, so that rates read 0 rather than
	// nothing before the first request.
	for _, op := range []string{"read", "write"} {
		m.bytes.WithLabelValues(op)
	}
	reg.MustRegister(m.requests, m.bytes, m.latency, m.walSync, m.walEntries, m.walBatch, m.walInline, m.commit, m.apply, m.copysets, m.leaders,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// register adds the metrics read from the running server's parts.
func (m *metrics) register(s *Server) {
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	counter := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, f)
	}
	m.reg.MustRegister(
		gauge("cairn_chunkserver_pool_free_chunks", "Clean preformatted chunk files ready for use.", func() float64 { return float64(s.pool.Stats().Clean) }),
		gauge("cairn_chunkserver_pool_growable_chunks", "Chunk files the pool may still create on demand (up to --pool-max and the disk's free space above --pool-reserve).", func() float64 { return float64(s.pool.Stats().Growable) }),
		gauge("cairn_chunkserver_pool_used_chunks", "Chunk files in use (chunks and WAL segments).", func() float64 { return float64(s.pool.Stats().InUse) }),
		gauge("cairn_chunkserver_pool_format_ratio", "How far the chunk file pool's formatting under way has come (1 when none is).", func() float64 { return float64(s.pool.Stats().FormatPercent) / 100 }),
		gauge("cairn_chunkserver_wal_segments", "Segments held by the shared WAL.", func() float64 { return float64(s.engine.WALStats().Segments) }),
		gauge("cairn_chunkserver_requests_inflight", "Chunk requests in flight.", func() float64 { return float64(s.inflight.Load()) }),
		gauge("cairn_chunkserver_proposal_bytes_inflight", "Bytes of proposals led here that are admitted and not yet applied or failed (bounded by --max-inflight-bytes).", func() float64 { return float64(s.engine.InflightBytes()) }),
		gauge("cairn_chunkserver_raft_log_memory_bytes", "Bytes of Raft log entries all copysets hold in memory (kept under --max-log-memory).", func() float64 { return float64(s.engine.LogBytes()) }),
		gauge("cairn_chunkserver_quiesced_copysets", "Replicas of copysets that stopped ticking and heartbeating until there is a write or a call (idle, or serving only reads).", func() float64 {
			n := 0
			for _, c := range s.engine.List() {
				if c.Quiesced() {
					n++
				}
			}
			return float64(n)
		}),
		gauge("cairn_chunkserver_broken_copysets", "Replicas stopped because their storage failed; they must be rebuilt from their peers.", func() float64 {
			n := 0
			for _, c := range s.engine.List() {
				if c.Broken() != nil {
					n++
				}
			}
			return float64(n)
		}),
		counter("cairn_chunkserver_raft_messages_sent_total", "Raft messages sent (heartbeats excluded).", func() float64 { return float64(s.engine.TransportStats().MessagesSent) }),
		counter("cairn_chunkserver_raft_messages_received_total", "Raft messages received (heartbeats excluded).", func() float64 { return float64(s.engine.TransportStats().MessagesReceived) }),
		counter("cairn_chunkserver_raft_heartbeats_sent_total", "Coalesced Raft heartbeats sent.", func() float64 { return float64(s.engine.TransportStats().HeartbeatsSent) }),
		counter("cairn_chunkserver_raft_heartbeats_received_total", "Coalesced Raft heartbeats received.", func() float64 { return float64(s.engine.TransportStats().HeartbeatsReceived) }),
		counter("cairn_chunkserver_raft_batches_sent_total", "Raft batches sent to peers.", func() float64 { return float64(s.engine.TransportStats().BatchesSent) }),
		counter("cairn_chunkserver_raft_messages_sent_inline_total", "Raft messages (a follower's answers to lone appends it made durable itself) sent by the goroutine that made them, not by the lane's sender.", func() float64 { return float64(s.engine.TransportStats().SentInline) }),
		counter("cairn_chunkserver_snapshots_sent_total", "Snapshots sent to peers that were behind or new (replica rebuilds and catch-ups).", func() float64 { return float64(s.engine.SnapshotStats().Sent) }),
		counter("cairn_chunkserver_snapshot_send_failures_total", "Snapshot transfers to peers that failed (Raft retries them).", func() float64 { return float64(s.engine.SnapshotStats().SendFailed) }),
		counter("cairn_chunkserver_snapshots_installed_total", "Snapshots installed here from a leader.", func() float64 { return float64(s.engine.SnapshotStats().Installed) }),
		gauge("cairn_chunkserver_apply_lag_entries", "Committed Raft entries the replicas here have not applied yet, summed.", func() float64 { return float64(s.engine.ApplyLag()) }),
		counter("cairn_chunkserver_leader_changes_total", "Leader changes the replicas here saw after their first leader (elections and transfers, each counted by every replica that saw it).", func() float64 { return float64(s.engine.LeaderChanges()) }),
		counter("cairn_chunkserver_raft_messages_refused_total", "Raft messages from the network refused before Raft saw them (malformed or impossible: see the chunkserver log).", func() float64 { return float64(s.engine.RefusedMessages()) }),
		counter("cairn_chunkserver_raft_messages_dropped_total", "Raft messages dropped (queue full or peer unreachable).", func() float64 { return float64(s.engine.TransportStats().Dropped) }),
	)
	m.reg.MustRegister(gauge("cairn_chunkserver_epoch_lease_seconds",
		"How long the epoch lease from the MDS still runs; 0 when it ran out and epoch-checked requests are refused.",
		func() float64 { return max(s.epochs.leaseLeft(time.Now()), 0).Seconds() }))
}

// observe counts a chunk request that ended with st, and the data bytes it
// read or wrote when it succeeded.
func (m *metrics) observe(op string, start time.Time, st chunkpb.Status, bytes int) {
	m.requests.WithLabelValues(op, statusLabel(st)).Inc()
	m.latency.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if bytes > 0 && st == chunkpb.Status_STATUS_OK {
		m.bytes.WithLabelValues(op).Add(float64(bytes))
	}
}

// statusLabel is a chunk status as a metric label: lower case, without
// the enum's prefix ("ok", "epoch_too_old").
func statusLabel(st chunkpb.Status) string {
	return strings.ToLower(strings.TrimPrefix(st.String(), "STATUS_"))
}

func (m *metrics) observeProposal(pt copyset.ProposalTimes) {
	m.commit.Observe(pt.Commit.Seconds())
	m.apply.Observe(pt.Apply.Seconds())
}

func (m *metrics) observeWALSync(si wal.SyncInfo) {
	m.walSync.Observe(si.Duration.Seconds())
	m.walEntries.Observe(float64(si.Entries))
	m.walBatch.Observe(float64(si.Groups))
	if si.Inline {
		m.walInline.Inc()
	}
}
