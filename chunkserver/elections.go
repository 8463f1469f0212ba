package chunkserver

import (
	"log/slog"
	"time"
)

// electionSummaryInterval is how often, at most, a chunkserver logs at info
// level how many leader elections its copysets saw: after a peer's pause
// hundreds of copysets elect at once, and a line each would flood the log
// (each copyset's own line is for debug level).
const electionSummaryInterval = 10 * time.Second

// electionSummary logs, at each tick, the leader changes the replicas here
// saw since the previous tick (total is the running count,
// copyset.Engine.LeaderChanges), and how many copysets this chunkserver
// leads now; nothing when there were none. It returns when stop closes.
func electionSummary(log *slog.Logger, every time.Duration, tick <-chan time.Time, stop <-chan struct{}, total func() uint64, leading func() int) {
	last := total()
	for {
		select {
		case <-stop:
			return
		case <-tick:
		}
		n := total()
		if n > last {
			log.Info("copysets elected new leaders", "elections", n-last, "in_last", every, "leading_here", leading())
		}
		last = n
	}
}

// electionSummaryLoop runs electionSummary until the chunkserver stops.
func (s *Server) electionSummaryLoop() {
	defer s.wg.Done()
	t := time.NewTicker(electionSummaryInterval)
	defer t.Stop()
	electionSummary(s.log, electionSummaryInterval, t.C, s.stop, s.engine.LeaderChanges, func() int {
		n := 0
		for _, c := range s.engine.List() {
			if c.IsLeader() {
				n++
			}
		}
		return n
	})
}
