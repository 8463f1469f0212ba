package mds

import (
	"context"
	"slices"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// Adding a replica begins on the MDS: before an add operator goes to the
// copyset's leader, the MDS creates the empty replica on the target
// chunkserver (CreateCopysets without members: the replica learns its
// configuration from the snapshot the leader then sends it, and a broken
// replica there is replaced by an empty one). Only the MDS creates copysets
// on a chunkserver (chunkserver.Policy), so a chunkserver cannot plant
// replicas on another. Creation is idempotent: a new MDS leader prepares the
// adds it finds again before it hands them out.

// readyLocked reports whether an operator may be handed to its copyset's
// leader: an add only once its target holds the replica it fills. l.mu
// held.
func (l *leaderState) readyLocked(key uint64, op *mdspb.Operator) bool {
	return op.Kind != mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER || l.mu.prepared[key] == op
}

// preparedLocked records that op's target holds its replica already (an add
// that goes on against a newer configuration: its learner joined). l.mu
// held.
func (l *leaderState) preparedLocked(key uint64, op *mdspb.Operator) {
	l.mu.prepared[key] = op
}

// prepareAdds creates, in the background, the target replicas of the
// durable add operators not prepared yet, and hands each add to its leader
// once its replica exists. Those that fail are tried again at the next
// scheduling round; an add whose target never takes it times out as any
// operator does.
func (l *leaderState) prepareAdds() {
	type job struct {
		key  uint64
		op   *mdspb.Operator
		addr string
	}
	var jobs []job
	l.mu.Lock()
	for key, op := range l.mu.prepared {
		if l.mu.operators[key] != op {
			delete(l.mu.prepared, key) // ended or replaced
		}
	}
	for key, op := range l.mu.operators {
		if op.Kind != mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER || l.mu.unsaved[op] || l.mu.prepared[key] == op || l.mu.preparing[key] ||
			!l.mayPrepareLocked(key, op) {
			continue
		}
		e := l.mu.chunkServers[op.Target.GetChunkserverId()]
		if e == nil || e.rec.Address == "" {
			continue
		}
		l.mu.preparing[key] = true
		jobs = append(jobs, job{key: key, op: op, addr: e.rec.Address})
	}
	l.mu.Unlock()
	for _, j := range jobs {
		// Bound by the leadership's context, not its wait group: this may
		// run from a call that outlives the leadership's stop.
		go func() {
			ctx, cancel := context.WithTimeout(l.ctx, l.s.cfg.RPCTimeout)
			err := l.createCopysetsOn(ctx, j.addr, []*copysetpb.CopysetSpec{{Copyset: j.op.Copyset, AddConfEpoch: j.op.ConfEpoch}})
			cancel()
			l.mu.Lock()
			delete(l.mu.preparing, j.key)
			current := l.mu.operators[j.key] == j.op
			if err == nil && current {
				l.preparedLocked(j.key, j.op)
			}
			l.mu.Unlock()
			switch {
			case err != nil:
				l.log.Warn("create the replica an add operator fills (tried again next round)", "copyset", j.op.Copyset.Name(),
					"target", j.op.Target.GetChunkserverId(), "address", j.addr, "err", err)
			case current:
				l.pushOperators([]*mdspb.Operator{j.op})
			}
		}()
	}
}

// mayPrepareLocked reports whether the MDS may create the replica an add
// fills now. Never on a voter: a broken voter replaced by an empty replica
// would forget its log and its vote. An add loaded from etcd at the start
// of this leadership may have finished under the previous leader without
// its end being recorded: it waits for the copyset's leader to report to
// this one (the report ends it if it is done). And the add must still
// apply: its epoch is the copyset's, or its target a learner (it goes on
// to promotion). l.mu held.
func (l *leaderState) mayPrepareLocked(key uint64, op *mdspb.Operator) bool {
	rec := l.mu.copysets[key]
	if rec == nil {
		return false
	}
	target := op.Target.GetChunkserverId()
	named := func(p *commonpb.Peer) bool { return p.ChunkserverId == target }
	if slices.ContainsFunc(rec.Peers, named) {
		return false
	}
	if l.mu.inherited[key] == op && !l.mu.reported[key] {
		return false
	}
	return op.ConfEpoch == rec.ConfEpoch || slices.ContainsFunc(rec.Learners, named)
}

// revokePreparedLocked forgets that the targets' replicas of adds exist
// when the target reports without a healthy one (it was removed, or it
// broke while being filled): the next round creates it again. held are
// the copysets the reporter holds a healthy replica of. l.mu held.
func (l *leaderState) revokePreparedLocked(reporter uint64, held map[uint64]bool) {
	for key, op := range l.mu.prepared {
		if op.Target.GetChunkserverId() == reporter && l.mu.operators[key] == op && !held[key] {
			delete(l.mu.prepared, key)
		}
	}
}
