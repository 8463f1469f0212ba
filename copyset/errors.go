package copyset

import (
	"errors"
	"fmt"
)

// Errors returned by the engine and its copysets.
var (
	// ErrNotLeader: the replica does not lead its copyset. Errors wrapping
	// it are *NotLeaderError and name the leader when known.
	ErrNotLeader = errors.New("copyset: not the leader")
	// ErrProposalLost: the entry was overwritten by a new leader; it was
	// not applied. Retrying is safe.
	ErrProposalLost = errors.New("copyset: proposal lost in a leader change")
	// ErrStopped: the engine or copyset is shut down.
	ErrStopped = errors.New("copyset: stopped")
	// ErrWouldWait: a read under WithoutWaiting would have had to wait
	// (for a ReadIndex round, what earlier leaders committed, or a
	// rewrite of the chunk files); nothing was read.
	ErrWouldWait = errors.New("copyset: the read would have to wait")
	// ErrExists: a copyset with that id exists with other members.
	ErrExists = errors.New("copyset: already exists")
	// ErrNotFound: no such copyset on this chunkserver.
	ErrNotFound = errors.New("copyset: not found")
	// ErrStaleEpoch: a membership operation named a configuration epoch
	// that is no longer current.
	ErrStaleEpoch = errors.New("copyset: configuration epoch changed")
	// ErrConfChangeInProgress: another membership change is not applied yet.
	ErrConfChangeInProgress = errors.New("copyset: membership change in progress")
	// ErrReadTimeout: the leader could not confirm its leadership in time.
	ErrReadTimeout = errors.New("copyset: read index not confirmed")
	// ErrTooLarge: a write is larger than MaxWriteSize.
	ErrTooLarge = errors.New("copyset: write too large")
	// ErrInvalidArgument: a proposal's sequence numbers or snapshot list
	// do not make sense; nothing is proposed.
	ErrInvalidArgument = errors.New("copyset: invalid argument")
	// ErrLogDamaged: a copyset's durable log does not continue its
	// checkpoint; entries it made durable are lost. The replica must be
	// rebuilt from its peers.
	ErrLogDamaged = errors.New("copyset: log does not continue the checkpoint")
	// ErrBroken: the replica stopped serving because its storage failed
	// (see Copyset.Broken); its peers go on without it.
	ErrBroken = errors.New("copyset: replica broken")
)

// NotLeaderError is returned when a replica does not lead its copyset.
type NotLeaderError struct {
	// Leader is the leader's node id, 0 when unknown.
	Leader uint64
}

func (e *NotLeaderError) Error() string {
	if e.Leader == 0 {
		return "copyset: not the leader (leader unknown)"
	}
	return fmt.Sprintf("copyset: not the leader (leader is %d)", e.Leader)
}

// Is makes errors.Is(err, ErrNotLeader) hold.
func (e *NotLeaderError) Is(target error) bool { return target == ErrNotLeader }
