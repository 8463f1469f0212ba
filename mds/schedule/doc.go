// Package schedule decides the operators that keep a cluster's copysets
// whole and balanced: the MDS's recover, drain and balance schedulers.
//
// The MDS leader calls Plan every scheduling round with a snapshot of what it
// knows (chunkservers with their zone, liveness, drain state and fullness;
// copysets with their voters, learners, leader and conf epoch; the operators
// already running) and queues the operators Plan returns. Plan is a pure
// function of that snapshot, so every decision is tested here without a
// cluster, and an MDS that takes over mid-way makes the same decisions from
// the state it loads and hears.
//
// Every replica move is add-then-remove, never below a quorum: a new replica
// joins as a learner, catches up from a snapshot and is promoted (one ADD
// operator), and only then is the replica it replaces removed (a REMOVE
// operator, planned in a later round from the copyset that now has one voter
// too many). Which voter goes is decided from the copyset alone (a bad
// member first, then one that shares a zone with another, then the one on
// the most loaded chunkserver), so the move needs no memory across rounds
// or MDS failovers. A leader is never removed: leadership moves first.
//
// The rules, in order of precedence, for each copyset with a live leader and
// no operator:
//
//  1. Cleanup: a learner no operator is adding (its add timed out or its
//     leader changed) is removed.
//  2. Shrink: a copyset with more voters than replicas loses one (the second
//     half of a move).
//  3. Recover and drain: a copyset with fewer voters than replicas, or with
//     a voter on a chunkserver that is down (offline longer than the
//     recover-after delay), retired, retiring, or whose replica is broken
//     beyond an in-place rebuild, gains a replica on a chunkserver of the
//     same physical pool, preferably in the zone of the replica it
//     replaces, else in a zone no other member uses; among those, the one
//     with the fewest replicas of the pool, then the emptiest. A copyset
//     with no such chunkserver is reported as blocked, with the reason.
//  4. Balance, only in a logical pool with nothing to recover: leaders per
//     chunkserver, by transferring leadership, and replicas per
//     chunkserver, by moving one, until every chunkserver is within the
//     tolerance of the mean (10% by default, and at least one). Replica
//     counts are compared inside each zone when the pool spans no more
//     zones than a copyset has replicas (every zone then holds one replica
//     of every copyset), else across the pool.
//
// Limits: at most MaxOpsPerChunkServer operators involve one chunkserver at
// a time (as the leader that sends a snapshot, the chunkserver that
// receives it, or the source of a move), counting the ones already running.
package schedule
