package mds

import (
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/copysethealth"
)

// healthHealthy is cairn_mds_copysets' health label of copysets with no
// reason to be unhealthy; the other values are copysethealth's reasons.
const healthHealthy = "healthy"

// copysetHealth is what the MDS knows of a copyset's health.
type copysetHealth struct {
	// allocatable: no member OFFLINE (or unregistered) and all the pool's
	// replicas; a copyset with no leader reported yet is allocatable.
	allocatable bool
	// reasons it is unhealthy (copysethealth.Reasons), each at most once,
	// in that order; none when healthy.
	reasons []string
}

// copysetHealthLocked classifies a copyset for allocation and metrics, as
// cairn-ops status does with its default thresholds.
func (l *leaderState) copysetHealthLocked(c *mdspb.Copyset, now time.Time) copysetHealth {
	replicas := uint32(3)
	if p := l.mu.logicalPools[c.Id.GetLogicalPoolId()]; p != nil && p.Replicas != 0 {
		replicas = p.Replicas
	}
	member := func(id uint64) (registered, offline bool) {
		e := l.mu.chunkServers[id]
		return e != nil, e != nil && l.onlineStateLocked(e, now) == mdspb.OnlineState_ONLINE_STATE_OFFLINE
	}
	return classifyCopyset(c, replicas, member, now)
}

// classifyCopyset judges c from its record (copysethealth.Judge, with the
// default thresholds); member tells a chunkserver's registration and
// whether it is OFFLINE.
func classifyCopyset(c *mdspb.Copyset, replicas uint32, member func(id uint64) (registered, offline bool), now time.Time) copysetHealth {
	findings := copysethealth.Judge(c, copysethealth.Params{
		Replicas: replicas, MaxLogGap: copysethealth.DefaultMaxLogGap, StaleAfter: copysethealth.DefaultStaleAfter,
		Now: now, Member: member,
	})
	h := copysetHealth{allocatable: uint32(len(c.Peers)) >= replicas, reasons: copysethealth.ReasonsOf(findings)}
	for _, p := range c.Peers {
		if registered, offline := member(p.ChunkserverId); !registered || offline {
			h.allocatable = false
		}
	}
	return h
}
