package mds

import (
	"context"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds/schedule"
)

// The schedulers. Every Schedule.Interval the leader hands package schedule
// a snapshot of the cluster and queues the operators it plans; they reach
// each copyset's leader with its next heartbeat answer, like a manual
// transfer-leader. Operators are kept in etcd, so a new MDS leader finds
// the ones under way; one that has not taken effect within the operator
// timeout is dropped, and its target avoided for that copyset for as long.
// A RETIRING chunkserver that no copyset names any more becomes RETIRED.

// transferTimeout bounds a transfer-leader operator: leadership moves in
// an election timeout or not at all.
const transferTimeout = time.Minute

// avoid is a chunkserver that did not take a copyset's replica in time.
type avoid struct {
	node  uint64
	until time.Time
}

// startScheduler runs scheduling rounds while this MDS leads.
func (l *leaderState) startScheduler() {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		t := time.NewTicker(l.s.cfg.Schedule.Interval)
		defer t.Stop()
		for {
			select {
			case <-l.ctx.Done():
				return
			case <-t.C:
			case <-l.schedKick:
			}
			l.scheduleOnce(l.ctx, time.Now())
		}
	}()
}

// scheduleOnce runs one round: drop operators past their timeout, plan and
// queue new ones, retire drained chunkservers.
func (l *leaderState) scheduleOnce(ctx context.Context, now time.Time) {
	cfg := &l.s.cfg.Schedule
	var expired []uint64
	var queued []*mdspb.Operator
	var retired []*mdspb.ChunkServer
	l.mu.Lock()
	for key, op := range l.mu.operators {
		timeout := cfg.OperatorTimeout
		if op.Kind == mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER {
			timeout = min(timeout, transferTimeout)
		}
		since := l.operatorCreatedLocked(op)
		if pr, ok := l.mu.progress[key]; ok && pr.at.After(since) {
			since = pr.at // an add counts from the last sign of its replica filling
		}
		if since.Add(timeout).After(now) {
			continue
		}
		delete(l.mu.operators, key)
		delete(l.mu.unsaved, op)
		delete(l.mu.progress, key)
		expired = append(expired, key)
		if op.Kind == mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER {
			l.mu.avoid[key] = avoid{node: op.Target.GetChunkserverId(), until: now.Add(cfg.OperatorTimeout)}
		}
		l.s.metrics.operatorsEnded.WithLabelValues(op.Kind.Label(), op.Reason, "timed_out").Inc()
		l.log.Warn("operator timed out; dropped", "copyset", op.Copyset.Name(),
			"kind", op.Kind.Label(), "target", op.Target.GetChunkserverId(), "reason", op.Reason, "age", now.Sub(l.operatorCreatedLocked(op)).Round(time.Second))
	}
	in := l.scheduleInputLocked(now)
	ops, blocked := schedule.Plan(in, schedule.Limits{
		MaxOpsPerChunkServer: cfg.MaxOperatorsPerChunkServer, Tolerance: cfg.BalanceTolerance, NoBalance: cfg.NoBalance,
	})
	for _, p := range ops {
		if op := l.queueLocked(p, now); op != nil {
			queued = append(queued, op)
		}
	}
	l.noteBlockedLocked(blocked)
	retired = l.drainedLocked()
	l.mu.Unlock()

	if err := l.persistCopysets(ctx, nil, expired); err != nil && ctx.Err() == nil {
		l.log.Warn("schedule: drop expired operators", "err", err)
	}
	if err := l.persistOperators(ctx, queued); err != nil && ctx.Err() == nil {
		l.log.Warn("schedule: persist operators", "err", err)
	}
	l.pushOperators(queued)
	l.prepareAdds()
	for _, rec := range retired {
		stillDrained := func(e *csEntry) bool {
			return e.rec.RwState == mdspb.RWState_RW_STATE_RETIRING && !l.holdsReplicasLocked(e.rec.Id)
		}
		if err := l.setRWStateIf(ctx, rec, mdspb.RWState_RW_STATE_RETIRED, stillDrained); err != nil && ctx.Err() == nil {
			l.log.Warn("schedule: retire drained chunkserver", "chunkserver", rec.Id, "err", err)
		}
	}
}

// queueLocked turns a planned operator into a queued one, unless the
// copyset moved on or took another meanwhile. l.mu held; the caller
// persists it.
func (l *leaderState) queueLocked(p schedule.Op, now time.Time) *mdspb.Operator {
	key := (&commonpb.CopysetRef{LogicalPoolId: p.Pool, CopysetId: p.Copyset}).Key()
	rec := l.mu.copysets[key]
	if rec == nil || l.mu.operators[key] != nil || rec.ConfEpoch != p.ConfEpoch {
		return nil
	}
	op := &mdspb.Operator{
		Copyset: proto.CloneOf(rec.Id), Kind: opKind(p.Kind), ConfEpoch: p.ConfEpoch,
		Target: &commonpb.Peer{ChunkserverId: p.Target}, Reason: p.Reason, CreatedUnix: now.Unix(),
	}
	if e := l.mu.chunkServers[p.Target]; e != nil {
		op.Target.Address = e.rec.Address
	}
	l.mu.operators[key] = op
	l.mu.unsaved[op] = true
	l.s.metrics.operatorsStarted.WithLabelValues(op.Kind.Label(), op.Reason).Inc()
	l.log.Info("operator queued", "copyset", commonpb.CopysetName(p.Pool, p.Copyset), "kind", op.Kind.Label(),
		"target", p.Target, "leader", rec.LeaderId, "reason", p.Reason, "conf_epoch", p.ConfEpoch)
	return op
}

// nextStepLocked plans the repair step that follows an operator that just
// ended on a copyset (the removal after an add, the removal after a
// leadership moved off the replica to remove), so that the leader gets it
// with the answer to the report that ended the first step instead of a
// scheduling round and a heartbeat later. l.mu held; the caller persists
// the operator.
func (l *leaderState) nextStepLocked(key uint64, now time.Time) *mdspb.Operator {
	op, ok := schedule.PlanCopyset(l.scheduleInputLocked(now),
		schedule.Limits{MaxOpsPerChunkServer: l.s.cfg.Schedule.MaxOperatorsPerChunkServer}, uint32(key>>32), uint32(key))
	if !ok {
		return nil
	}
	return l.queueLocked(op, now)
}

// pushOperators hands operators just written to their copysets' leaders at
// once (mdspb.OperatorService), so that a step does not wait for the
// leader's next heartbeat; best effort, as heartbeat answers carry them
// until they take effect.
func (l *leaderState) pushOperators(ops []*mdspb.Operator) {
	byAddr := map[string][]*mdspb.Operator{}
	l.mu.Lock()
	for _, op := range ops {
		key := op.Copyset.Key()
		c := l.mu.copysets[key]
		if l.mu.operators[key] != op || l.mu.unsaved[op] || !l.readyLocked(key, op) || c == nil || c.LeaderId == 0 {
			continue // dropped, not written, its replica not created, or no leader to hand it to
		}
		if e := l.mu.chunkServers[c.LeaderId]; e != nil && e.rec.Address != "" {
			byAddr[e.rec.Address] = append(byAddr[e.rec.Address], proto.CloneOf(op))
		}
	}
	l.mu.Unlock()
	if l.ctx.Err() != nil {
		return // leadership ended
	}
	for addr, ops := range byAddr {
		// Bound by the leadership's context, not its wait group: this may
		// run from a call that outlives the leadership's stop.
		go func() {
			cc, err := l.s.conns.Get(addr)
			if err == nil {
				ctx, cancel := context.WithTimeout(l.ctx, l.s.cfg.RPCTimeout)
				_, err = mdspb.NewOperatorServiceClient(cc).StartOperators(ctx, &mdspb.StartOperatorsRequest{Operators: ops})
				cancel()
			}
			if err != nil {
				l.log.Debug("hand operators to a leader (its heartbeat will carry them)", "address", addr, "operators", len(ops), "err", err)
			}
		}()
	}
}

// wakeScheduler asks for a scheduling round now (an operator ended: there
// may be room for another).
func (l *leaderState) wakeScheduler() {
	select {
	case l.schedKick <- struct{}{}:
	default:
	}
}

// operatorCreatedLocked is when an operator was queued; one from an older
// MDS that did not record it counts from this leader's start.
func (l *leaderState) operatorCreatedLocked(op *mdspb.Operator) time.Time {
	if op.CreatedUnix == 0 {
		return l.since
	}
	if t := time.Unix(op.CreatedUnix, 0); t.After(l.since) {
		return t
	}
	return l.since
}

// scheduleInputLocked is the snapshot the schedulers plan from. l.mu held.
func (l *leaderState) scheduleInputLocked(now time.Time) schedule.Input {
	cfg := &l.s.cfg.Schedule
	in := schedule.Input{Running: map[uint64]int{}}
	for id, e := range l.mu.chunkServers {
		heard := e.lastHB
		if heard.IsZero() {
			heard = l.since
		}
		used := e.capacity.UsedFraction()
		in.ChunkServers = append(in.ChunkServers, schedule.ChunkServer{
			ID: id, Zone: e.rec.ZoneId, ZoneName: l.mu.zones[e.rec.ZoneId].GetName(), PhysPool: e.physPool,
			Online:   l.onlineStateLocked(e, now) == mdspb.OnlineState_ONLINE_STATE_ONLINE,
			Down:     now.Sub(heard) > cfg.RecoverAfter,
			Retiring: e.rec.RwState == mdspb.RWState_RW_STATE_RETIRING,
			Retired:  e.rec.RwState == mdspb.RWState_RW_STATE_RETIRED,
			Full:     used >= cfg.SpaceFull,
			Used:     used,
		})
	}
	for key, op := range l.mu.operators {
		if c := l.mu.copysets[key]; c != nil && c.LeaderId != 0 {
			in.Running[c.LeaderId]++
		}
		if op.Kind != mdspb.OperatorKind_OPERATOR_KIND_REMOVE_PEER {
			in.Running[op.Target.GetChunkserverId()]++
		}
	}
	for key, c := range l.mu.copysets {
		pool := l.mu.logicalPools[c.Id.GetLogicalPoolId()]
		if pool == nil || pool.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
			continue
		}
		cs := schedule.Copyset{
			Pool: pool.Id, PhysPool: pool.PhysicalPoolId, ID: c.Id.GetCopysetId(), Replicas: int(max(pool.Replicas, 1)),
			Leader: c.LeaderId, ConfEpoch: c.ConfEpoch,
			Busy: l.mu.operators[key] != nil || c.Pending.GetKind() != 0,
		}
		for _, p := range c.Peers {
			cs.Voters = append(cs.Voters, p.ChunkserverId)
		}
		for _, p := range c.Learners {
			cs.Learners = append(cs.Learners, p.ChunkserverId)
		}
		if rb := l.mu.rebuilds[key]; rb != nil {
			if rb.gaveUp {
				cs.Broken = append(cs.Broken, rb.node)
			} else {
				cs.Busy = true
			}
		}
		if until, ok := l.mu.pinned[key]; ok {
			if now.After(until) {
				delete(l.mu.pinned, key)
			} else {
				cs.Pinned = true
			}
		}
		if a, ok := l.mu.avoid[key]; ok {
			if now.After(a.until) {
				delete(l.mu.avoid, key)
			} else {
				cs.Avoid = append(cs.Avoid, a.node)
			}
		}
		in.Copysets = append(in.Copysets, cs)
	}
	return in
}

// noteBlockedLocked keeps the copysets the schedulers cannot repair now and
// logs when that set changes. l.mu held.
func (l *leaderState) noteBlockedLocked(blocked []schedule.Blocked) {
	changed := len(blocked) != len(l.mu.blocked)
	for i := range blocked {
		if !changed && blocked[i] != l.mu.blocked[i] {
			changed = true
		}
	}
	if !changed {
		return
	}
	l.mu.blocked = blocked
	if len(blocked) > 0 {
		l.log.Warn("copysets need a repair no chunkserver can take", "copysets", len(blocked),
			"first", commonpb.CopysetName(blocked[0].Pool, blocked[0].Copyset), "why", blocked[0].Reason)
	}
}

// drainedLocked returns the RETIRING chunkservers that no copyset names
// and no operator targets any more. l.mu held.
func (l *leaderState) drainedLocked() []*mdspb.ChunkServer {
	var out []*mdspb.ChunkServer
	for id, e := range l.mu.chunkServers {
		if e.rec.RwState != mdspb.RWState_RW_STATE_RETIRING || l.holdsReplicasLocked(id) {
			continue
		}
		out = append(out, proto.CloneOf(e.rec))
	}
	return out
}

// holdsReplicasLocked reports whether any copyset names a chunkserver as a
// voter or learner, or any operator targets it. l.mu held.
func (l *leaderState) holdsReplicasLocked(id uint64) bool {
	for _, c := range l.mu.copysets {
		has := func(p *commonpb.Peer) bool { return p.ChunkserverId == id }
		if slices.ContainsFunc(c.Peers, has) || slices.ContainsFunc(c.Learners, has) {
			return true
		}
	}
	for _, op := range l.mu.operators {
		if op.Target.GetChunkserverId() == id && op.Kind == mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER {
			return true
		}
	}
	return false
}

// setRWState records a chunkserver's read-write state.
func (l *leaderState) setRWState(ctx context.Context, rec *mdspb.ChunkServer, st mdspb.RWState) error {
	return l.setRWStateIf(ctx, rec, st, nil)
}

// setRWStateIf is setRWState when ok, checked under the write lock, still
// holds: a drained chunkserver becomes RETIRED only if nobody cancelled its
// drain or gave it a replica meanwhile. l.mu held while ok runs.
func (l *leaderState) setRWStateIf(ctx context.Context, rec *mdspb.ChunkServer, st mdspb.RWState, ok func(*csEntry) bool) error {
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	l.mu.Lock()
	e := l.mu.chunkServers[rec.Id]
	if e == nil || (ok != nil && !ok(e)) {
		l.mu.Unlock()
		return nil
	}
	next := proto.CloneOf(e.rec)
	l.mu.Unlock()
	from := next.RwState
	next.RwState = st
	if _, err := l.st.txn(ctx, nil, putOp(l.st.k.chunkServer(next.Id), next)); err != nil {
		return err
	}
	l.mu.Lock()
	if e := l.mu.chunkServers[rec.Id]; e != nil {
		e.rec = next
	}
	l.mu.Unlock()
	l.log.Info("chunkserver state changed", "chunkserver", next.Id, "from", from.Label(), "to", st.Label())
	return nil
}

func opKind(k schedule.Kind) mdspb.OperatorKind {
	switch k {
	case schedule.TransferLeader:
		return mdspb.OperatorKind_OPERATOR_KIND_TRANSFER_LEADER
	case schedule.AddPeer:
		return mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER
	case schedule.RemovePeer:
		return mdspb.OperatorKind_OPERATOR_KIND_REMOVE_PEER
	}
	return mdspb.OperatorKind_OPERATOR_KIND_UNKNOWN
}

// addProgress is the last sign that an add's new replica is being filled:
// a snapshot on its way, or its match index moving.
type addProgress struct {
	match uint64
	at    time.Time
}

// noteAddProgressLocked records, from the leader's report, that the target
// of an add is receiving a snapshot or catching up, so that a large
// replica filling slowly is not timed out while it fills. l.mu held.
func (l *leaderState) noteAddProgressLocked(key uint64, op *mdspb.Operator, cs *copysetpb.CopysetStatus, now time.Time) {
	if op.Kind != mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER {
		delete(l.mu.progress, key)
		return
	}
	for _, p := range cs.Progress {
		if p.ChunkserverId != op.Target.GetChunkserverId() {
			continue
		}
		last := l.mu.progress[key]
		if p.State == "snapshot" || p.MatchIndex > last.match {
			l.mu.progress[key] = addProgress{match: max(p.MatchIndex, last.match), at: now}
		}
	}
}

// movedBytes is a replica filled: when, and about how many bytes.
type movedBytes struct {
	at    time.Time
	bytes uint64
}

// movedWindow is how far back the copy rate looks.
const movedWindow = time.Minute

// noteMovedLocked records a replica filled. l.mu held.
func (l *leaderState) noteMovedLocked(now time.Time, bytes uint64) {
	l.mu.moved = append(l.mu.moved, movedBytes{at: now, bytes: bytes})
	l.s.metrics.movedBytes.Add(float64(bytes))
	l.trimMovedLocked(now)
}

func (l *leaderState) trimMovedLocked(now time.Time) {
	i := 0
	for i < len(l.mu.moved) && now.Sub(l.mu.moved[i].at) > movedWindow {
		i++
	}
	l.mu.moved = l.mu.moved[i:]
}

// scheduleStatus reports what the schedulers have left to do and how fast
// they go.
func (l *leaderState) scheduleStatus(now time.Time) *mdspb.GetScheduleStatusResponse {
	cfg := &l.s.cfg.Schedule
	out := &mdspb.GetScheduleStatusResponse{
		SpaceWarn: cfg.SpaceWarn, SpaceFull: cfg.SpaceFull,
		RecoverAfterSeconds: uint32(cfg.RecoverAfter / time.Second), BalanceEnabled: !cfg.NoBalance,
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	sum := schedule.Summarize(l.scheduleInputLocked(now))
	out.CopysetsToRepair, out.CopysetsMoving = uint32(len(sum.ToRepair)), uint32(len(sum.Moving))
	receiving := map[uint64]bool{}
	for _, id := range sum.ToRepair {
		receiving[(&commonpb.CopysetRef{LogicalPoolId: id[0], CopysetId: id[1]}).Key()] = true
	}
	reasons := map[string]uint32{}
	for key, op := range l.mu.operators {
		reasons[op.Reason]++
		if op.Kind == mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER {
			receiving[key] = true
		}
	}
	for key := range receiving {
		if c := l.mu.copysets[key]; c != nil {
			out.BytesToMove += c.ChunkCount * l.consts.ChunkSize
		}
	}
	for r, n := range reasons {
		out.Operators = append(out.Operators, &mdspb.OperatorCount{Reason: r, Count: n})
	}
	slices.SortFunc(out.Operators, func(a, b *mdspb.OperatorCount) int { return strings.Compare(a.Reason, b.Reason) })
	for _, b := range l.mu.blocked {
		out.Blocked = append(out.Blocked, &mdspb.BlockedCopyset{
			Copyset: &commonpb.CopysetRef{LogicalPoolId: b.Pool, CopysetId: b.Copyset}, Reason: b.Reason,
		})
	}
	l.trimMovedLocked(now)
	for _, m := range l.mu.moved {
		out.BytesMovedLastMinute += m.bytes
	}
	if out.BytesMovedLastMinute > 0 {
		span := min(movedWindow, now.Sub(l.since))
		out.BytesPerSecond = float64(out.BytesMovedLastMinute) / max(span.Seconds(), 1)
	}
	return out
}
