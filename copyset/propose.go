package copyset

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"go.etcd.io/raft/v3"
)

// Proposal is a write or delete handed to the copyset. Wait returns once it
// is applied (durable on a quorum and applied on this replica) or failed.
type Proposal struct {
	id    uint64
	data  []byte
	done  chan struct{}
	index uint64 // log index, once known (Raft worker)
	term  uint64
	once  sync.Once
	res   uint64
	err   error
}

func (p *Proposal) finish(index uint64, err error) {
	p.once.Do(func() {
		p.res, p.err = index, err
		close(p.done)
	})
}

// Wait waits for the outcome. When ctx ends first, the outcome is unknown:
// the entry may still be applied later.
func (p *Proposal) Wait(ctx context.Context) (appliedIndex uint64, err error) {
	select {
	case <-p.done:
		return p.res, p.err
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// ProposeWrite hands a chunk write to the copyset's log. The caller checked
// the request; the copyset refuses only when it does not lead. The data is
// copied.
func (c *Copyset) ProposeWrite(chunk, volume, epoch uint64, off int64, data []byte) (*Proposal, error) {
	if int64(len(data)) > c.e.MaxWriteSize() {
		return nil, fmt.Errorf("%w: %d bytes (limit %d)", ErrTooLarge, len(data), c.e.MaxWriteSize())
	}
	return c.proposeCommand(&command{op: opWrite, chunk: chunk, volume: volume, epoch: epoch, offset: uint64(off), data: data})
}

// ProposeDelete hands a chunk delete to the copyset's log.
func (c *Copyset) ProposeDelete(chunk, volume, epoch uint64) (*Proposal, error) {
	return c.proposeCommand(&command{op: opDelete, chunk: chunk, volume: volume, epoch: epoch})
}

// Write proposes a chunk write and waits for it to be applied.
func (c *Copyset) Write(ctx context.Context, chunk, volume, epoch uint64, off int64, data []byte) (uint64, error) {
	p, err := c.ProposeWrite(chunk, volume, epoch, off, data)
	if err != nil {
		return 0, err
	}
	return c.waitProposal(ctx, p)
}

// Delete proposes a chunk delete and waits for it to be applied.
func (c *Copyset) Delete(ctx context.Context, chunk, volume, epoch uint64) (uint64, error) {
	p, err := c.ProposeDelete(chunk, volume, epoch)
	if err != nil {
		return 0, err
	}
	return c.waitProposal(ctx, p)
}

func (c *Copyset) waitProposal(ctx context.Context, p *Proposal) (uint64, error) {
	idx, err := p.Wait(ctx)
	if err != nil && ctx.Err() != nil {
		c.wmu.Lock()
		delete(c.waiters, p.id)
		c.wmu.Unlock()
	}
	return idx, err
}

func (c *Copyset) proposeCommand(cmd *command) (*Proposal, error) {
	if !c.isLeader.Load() {
		return nil, &NotLeaderError{Leader: c.leader.Load()}
	}
	cmd.proposer = c.e.cfg.NodeID
	cmd.id = c.e.newProposalID()
	p := &Proposal{id: cmd.id, data: cmd.encode(), done: make(chan struct{})}
	c.wmu.Lock()
	c.waiters[p.id] = p
	c.wmu.Unlock()
	if !c.enqueue(func(in *inbox) { in.props = append(in.props, p) }) {
		c.dropWaiter(p, ErrStopped)
		return nil, ErrStopped
	}
	return p, nil
}

func (c *Copyset) dropWaiter(p *Proposal, err error) {
	c.wmu.Lock()
	delete(c.waiters, p.id)
	if p.index != 0 && c.byIndex[p.index] == p {
		delete(c.byIndex, p.index)
	}
	c.wmu.Unlock()
	p.finish(0, err)
}

// propose runs on the Raft worker.
func (c *Copyset) propose(p *Proposal) {
	if !c.isLeader.Load() {
		c.dropWaiter(p, &NotLeaderError{Leader: c.leader.Load()})
		return
	}
	if err := c.rn.Propose(p.data); err != nil {
		if errors.Is(err, raft.ErrProposalDropped) {
			err = &NotLeaderError{Leader: c.leader.Load()}
		}
		c.dropWaiter(p, err)
	}
}

// assignIndex records where a proposal landed in the log.
func (c *Copyset) assignIndex(id, index, term uint64) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	p := c.waiters[id]
	if p == nil {
		return
	}
	p.index, p.term = index, term
	c.byIndex[index] = p
}
