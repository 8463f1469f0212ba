package mds

import (
	"context"

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
	for key, op := range l.mu.operators {
		if op.Kind != mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER || l.mu.unsaved[op] || l.mu.prepared[key] == op || l.mu.preparing[key] {
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
			err := l.createCopysetsOn(ctx, j.addr, []*copysetpb.CopysetSpec{{Copyset: j.op.Copyset}})
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
