package copyset

import (
	"sort"
	"time"
)

// ticker ticks every copyset and does housekeeping.
func (e *Engine) ticker() {
	defer e.wg.Done()
	t := time.NewTicker(e.cfg.TickInterval)
	defer t.Stop()
	housekeeping := time.NewTicker(time.Second)
	defer housekeeping.Stop()
	for {
		select {
		case <-e.stopped:
			return
		case <-t.C:
			if !e.cfg.TestingKnobs.ManualTicks {
				e.tickAll()
			}
		case <-housekeeping.C:
			e.housekeeping()
		}
	}
}

// tickAll gives every copyset one Raft tick.
func (e *Engine) tickAll() {
	e.mu.RLock()
	defer e.mu.RUnlock()
	quiesce := e.quiesceEnabled()
	for _, c := range e.groups {
		if quiesce && c.quiesced.Load() {
			c.tickQuiesced()
		} else {
			c.tick()
		}
	}
}

// housekeeping bounds the WAL and lets idle copysets checkpoint on their
// interval.
func (e *Engine) housekeeping() {
	e.walPressure(e.wal.Stats().Segments)
	for _, c := range e.List() {
		c.maybeTimedCheckpoint()
	}
	e.relieveLogPressure()
}

// relieveLogPressure keeps the entries held in memory under MaxLogBytes:
// when they exceed it, the copysets holding the most checkpoint and then
// keep only what Raft cannot do without (see compact), until what they
// hold covers the excess. Called by housekeeping, it must not block.
func (e *Engine) relieveLogPressure() {
	excess := e.logBytes.Load() - e.cfg.MaxLogBytes/2
	if e.logBytes.Load() <= e.cfg.MaxLogBytes || excess <= 0 {
		return
	}
	cs := e.List()
	sort.Slice(cs, func(i, j int) bool { return cs[i].memLog.Load() > cs[j].memLog.Load() })
	for _, c := range cs {
		if excess <= 0 {
			break
		}
		excess -= c.memLog.Load()
		c.pressure.Store(true)
		c.requestCheckpoint()
	}
}

// walPressure keeps the shared WAL near MaxWALSegments: when it holds more,
// every copyset that pins one of the excess oldest segments is asked to
// checkpoint. Called by the WAL when it starts a segment (or cannot get
// one) and by housekeeping; it must not block.
func (e *Engine) walPressure(segments int) {
	excess := segments - e.cfg.MaxWALSegments/2
	// e.wal is nil while the log is being opened (recovery may report
	// pressure before any copyset exists).
	if segments <= e.cfg.MaxWALSegments || excess <= 0 || e.wal == nil {
		return
	}
	for _, g := range e.wal.PinningGroups(excess) {
		if c := e.get(GroupID(g)); c != nil {
			c.requestCheckpoint()
		}
	}
}

func (e *Engine) raftWorker() {
	defer e.wg.Done()
	for {
		c, ok := e.raftQ.pop()
		if !ok {
			return
		}
		c.runRaft()
	}
}

func (e *Engine) applyWorker() {
	defer e.wg.Done()
	for {
		c, ok := e.applyQ.pop()
		if !ok {
			return
		}
		c.runApply()
	}
}
