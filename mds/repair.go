package mds

import (
	"context"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// Broken replicas. A chunkserver reports a replica broken when the storage
// under it failed in a way the replica could not repair by itself (a chunk
// fdatasync that failed again after rewriting from the log, apply errors
// that persist, a log that does not continue its checkpoint at recovery).
// Such a replica votes, acknowledges and serves nothing; its copyset runs on
// the other replicas. The MDS rebuilds it from them in place: an operator
// asks the copyset's leader to remove the replica, and once it is gone,
// another to add the same chunkserver back, which creates an empty replica
// there (the broken one goes to the trash), fills it with a snapshot and
// promotes it once it caught up. A replica that breaks again is rebuilt at
// most maxRebuilds times; after that the recover scheduler replaces it with
// a replica on another chunkserver.

// maxRebuilds bounds the rebuilds of one replica in one MDS term.
const maxRebuilds = 3

// rebuild is a broken replica being rebuilt.
type rebuild struct {
	node     uint64 // chunkserver of the broken replica
	reason   string
	attempts int
	// gaveUp is set when the replica broke again after its last rebuild:
	// the schedulers replace it elsewhere.
	gaveUp bool
}

// noteBrokenLocked records a replica's report that it is broken and, when
// the copyset can go on without it, returns the operator that removes it.
// l.mu held.
func (l *leaderState) noteBrokenLocked(key uint64, rec *mdspb.Copyset, reporter uint64, reason string) *mdspb.Operator {
	rb := l.mu.rebuilds[key]
	if rb == nil || rb.node != reporter {
		rb = &rebuild{node: reporter}
		l.mu.rebuilds[key] = rb
	}
	if rb.reason != reason {
		rb.reason = reason
		l.log.Warn("replica broken; rebuilding it from its peers", "copyset", rec.Id.Name(),
			"chunkserver", reporter, "reason", reason)
	}
	voter := slices.ContainsFunc(rec.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == reporter })
	if voter && rb.attempts >= maxRebuilds && !rb.gaveUp {
		rb.gaveUp = true
		l.log.Warn("replica broke again after its last rebuild; replacing it on another chunkserver", "copyset", rec.Id.Name(),
			"chunkserver", reporter, "rebuilds", rb.attempts)
	}
	if !voter || l.mu.operators[key] != nil || rec.LeaderId == 0 || rec.LeaderId == reporter || rb.gaveUp {
		return nil
	}
	rb.attempts++
	return l.memberOpLocked(rec, mdspb.OperatorKind_OPERATOR_KIND_REMOVE_PEER, reporter)
}

// continueRebuildLocked moves the rebuild of a copyset's broken replica on
// after a report: once the replica is out of the copyset, the leader's
// report brings the operator that adds it back; once it reports as a
// healthy voter, the rebuild is done. l.mu held.
func (l *leaderState) continueRebuildLocked(key uint64, rec *mdspb.Copyset, reporter uint64, cs *copysetpb.CopysetStatus) *mdspb.Operator {
	rb := l.mu.rebuilds[key]
	if rb == nil || cs.GetBroken() != "" {
		return nil
	}
	voter := slices.ContainsFunc(rec.Peers, func(p *commonpb.Peer) bool { return p.ChunkserverId == rb.node })
	switch {
	case rb.gaveUp:
		// The schedulers own it: done once they replaced it.
		if !voter {
			delete(l.mu.rebuilds, key)
		}
	case voter && reporter == rb.node:
		l.log.Info("broken replica rebuilt", "copyset", rec.Id.Name(), "chunkserver", rb.node)
		delete(l.mu.rebuilds, key)
	case !voter && reporter == rec.LeaderId && l.mu.operators[key] == nil:
		// Gone from the copyset (or a learner still catching up): add it
		// back. The leader's add creates the empty replica, which replaces
		// the broken one, and promotes it once it caught up.
		return l.memberOpLocked(rec, mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER, rb.node)
	}
	return nil
}

// joiningLocked reports whether node's replica of a copyset is on its way
// in: the target of a pending add, a learner the leader replicates to, or a
// broken replica's chunkserver being given a new one. Such a replica must
// not be dropped for holding an old configuration. l.mu held.
func (l *leaderState) joiningLocked(key uint64, rec *mdspb.Copyset, node uint64, cs *copysetpb.CopysetStatus) bool {
	if cs.GetBroken() != "" {
		return false
	}
	if op := l.mu.operators[key]; op != nil && op.Kind == mdspb.OperatorKind_OPERATOR_KIND_ADD_PEER && op.Target.GetChunkserverId() == node {
		return true
	}
	if rb := l.mu.rebuilds[key]; rb != nil && rb.node == node {
		return true
	}
	return slices.ContainsFunc(rec.Progress, func(p *copysetpb.PeerProgress) bool { return p.ChunkserverId == node })
}

// memberOpLocked makes a membership operator on node against the copyset's
// current configuration and queues it in memory; the caller persists it.
// l.mu held.
func (l *leaderState) memberOpLocked(rec *mdspb.Copyset, kind mdspb.OperatorKind, node uint64) *mdspb.Operator {
	target := &commonpb.Peer{ChunkserverId: node}
	if e := l.mu.chunkServers[node]; e != nil {
		target.Address = e.rec.Address
	}
	op := &mdspb.Operator{Copyset: proto.CloneOf(rec.Id), Kind: kind, ConfEpoch: rec.ConfEpoch, Target: target,
		Reason: "rebuild", CreatedUnix: time.Now().Unix()}
	l.mu.operators[rec.Id.Key()] = op
	l.mu.unsaved[op] = true
	l.s.metrics.operatorsStarted.WithLabelValues(kind.Label(), op.Reason).Inc()
	l.log.Info("operator queued to rebuild a broken replica", "copyset", rec.Id.Name(),
		"kind", kind.String(), "chunkserver", node, "conf_epoch", rec.ConfEpoch)
	return op
}

// forgetUnsaved drops operators queued in memory that could not be
// written; the schedulers plan again.
func (l *leaderState) forgetUnsaved(ops []*mdspb.Operator) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, op := range ops {
		if key := op.Copyset.Key(); l.mu.operators[key] == op {
			delete(l.mu.operators, key)
		}
		delete(l.mu.unsaved, op)
	}
}

// persistOperators writes operators queued in memory to etcd, so that they
// survive an MDS failover; from then on they are handed out. Those it could
// not write are dropped.
func (l *leaderState) persistOperators(ctx context.Context, ops []*mdspb.Operator) error {
	if len(ops) == 0 {
		return nil
	}
	l.topoWrite.Lock()
	defer l.topoWrite.Unlock()
	for i, op := range ops {
		l.mu.Lock()
		current := l.mu.operators[op.Copyset.Key()] == op
		if !current {
			delete(l.mu.unsaved, op)
		}
		l.mu.Unlock()
		if !current {
			continue // ended or replaced before it was written: not a ghost in etcd
		}
		if _, err := l.st.txn(ctx, nil, putOp(l.st.k.operator(op.Copyset.LogicalPoolId, op.Copyset.CopysetId), op)); err != nil {
			l.forgetUnsaved(ops[i:])
			return err
		}
		l.mu.Lock()
		delete(l.mu.unsaved, op)
		l.mu.Unlock()
	}
	return nil
}
