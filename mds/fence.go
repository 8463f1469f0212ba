package mds

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/mdspb"
)

// Fencing: a writable open bumps the volume's epoch (updateVolume) and then
// makes it binding on every chunkserver before it returns (fenceEpoch).
//
// A chunkserver trusts its epoch table only under the epoch lease that each
// heartbeat answer grants: until the heartbeat's send time plus EpochLease.
// Every answer generated after a bump carries the new table (the chunkserver
// reports the table version it holds, and the bump raised the version before
// it was recorded as done). So once EpochLease has passed after a bump, every
// chunkserver either learned the new epoch or holds no lease and serves no
// epoch-checked request. fenceEpoch therefore pushes the epoch to every
// chunkserver of the pool and returns at once if all acknowledge; otherwise
// it waits until the bump time plus EpochLease plus a margin, or until every
// chunkserver that missed the push has reported the new table version in a
// heartbeat, whichever comes first.

// fenceMargin is added to a lease the MDS waits out: the MDS and the
// chunkservers measure it on different monotonic clocks, which may run at
// slightly different rates, and a chunkserver checks its lease a little
// before it queues the write it admits.
func fenceMargin(lease time.Duration) time.Duration {
	return max(lease/10, 100*time.Millisecond)
}

// recordEpochLease reads the epoch lease that earlier leaders granted and
// records this leader's, before it answers any heartbeat. The stored value
// is never below a lease still outstanding: a longer lease is written at
// once, a shorter one only after the stored one has run out since this
// leader took over (every lease of an earlier leader was granted before).
func (l *leaderState) recordEpochLease(ctx context.Context) error {
	key := l.st.k.epochLease()
	v, found, err := l.st.getRaw(ctx, key)
	if err != nil {
		return err
	}
	var prev time.Duration
	if found {
		ms, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return fmt.Errorf("%s holds %q: %w", key, v, err)
		}
		prev = time.Duration(ms) * time.Millisecond
	}
	own := l.s.cfg.EpochLease
	l.prevLease = prev
	put := clientv3.OpPut(key, strconv.FormatInt(own.Milliseconds(), 10))
	switch {
	case own > prev:
		_, err := l.st.txn(ctx, nil, put)
		return err
	case own < prev:
		l.log.Info("epoch lease shortened; writable opens wait out the longer lease of earlier leaders until it has run out",
			"lease", own, "earlier_lease", prev)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			t := time.NewTimer(time.Until(l.since.Add(prev + fenceMargin(prev))))
			defer t.Stop()
			select {
			case <-l.ctx.Done():
				return
			case <-t.C:
			}
			if _, err := l.st.txn(l.ctx, nil, put); err != nil && l.ctx.Err() == nil {
				l.log.Warn("record the shortened epoch lease", "err", err)
			}
		}()
	}
	return nil
}

// fenceEpoch makes volume v's epoch, recorded at epoch table version version
// at time bumped, binding on every chunkserver of its physical pool (see the
// comment at the top of this file). It returns nil once no chunkserver can
// admit a request with an older epoch, and an error only when ctx ends first;
// the epoch stays raised either way, so a retried open still fences.
func (l *leaderState) fenceEpoch(ctx context.Context, v *mdspb.Volume, version uint64, bumped time.Time) error {
	type target struct {
		id   uint64
		addr string
	}
	var targets []target
	l.mu.Lock()
	pp := l.mu.logicalPools[v.LogicalPoolId].GetPhysicalPoolId()
	for _, e := range l.mu.chunkServers {
		if e.physPool == pp {
			targets = append(targets, target{e.rec.Id, e.rec.Address})
		}
	}
	l.mu.Unlock()
	lease := l.s.cfg.EpochLease
	timeout := min(l.s.cfg.RPCTimeout, lease/2)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		missed = map[uint64]string{} // chunkserver -> why the push failed
	)
	for _, t := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.updateEpochOn(ctx, t.addr, v, timeout); err != nil {
				mu.Lock()
				missed[t.id] = fmt.Sprintf("chunkserver %d (%s): %v", t.id, t.addr, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(missed) == 0 {
		l.fenced(v.Id, version)
		return nil
	}
	deadline := bumped.Add(lease + fenceMargin(lease))
	if prev := l.prevLease; prev > lease {
		deadline = maxTime(deadline, l.since.Add(prev+fenceMargin(prev)))
	}
	why := make([]string, 0, len(missed))
	for _, w := range missed {
		why = append(why, w)
	}
	sort.Strings(why)
	l.log.Warn("writable open waits until the chunkservers that missed the epoch push have lost their epoch lease or report the new epoch table",
		"volume", v.Name, "epoch", v.Epoch, "table_version", version, "wait", time.Until(deadline).Round(time.Millisecond),
		"lease", lease, "missed", strings.Join(why, "; "))
	tick := time.NewTicker(min(max(l.s.cfg.HeartbeatInterval/10, 10*time.Millisecond), 100*time.Millisecond))
	defer tick.Stop()
	for {
		l.mu.Lock()
		for id := range missed {
			if e := l.mu.chunkServers[id]; e != nil && e.epochVersion >= version {
				delete(missed, id) // it merged a table that holds the new epoch
			}
		}
		l.mu.Unlock()
		if len(missed) == 0 {
			l.log.Info("writable open: every chunkserver that missed the epoch push has reported the new epoch table",
				"volume", v.Name, "epoch", v.Epoch)
			l.fenced(v.Id, version)
			return nil
		}
		if !time.Now().Before(deadline) {
			l.log.Info("writable open: the epoch leases of the chunkservers that missed the push have run out",
				"volume", v.Name, "epoch", v.Epoch, "waited", time.Since(bumped).Round(time.Millisecond))
			l.fenced(v.Id, version)
			return nil
		}
		select {
		case <-ctx.Done():
			return status.Errorf(status.FromContextError(ctx.Err()).Code(),
				"volume %q epoch %d is recorded, but the open ended before the chunkservers that missed the push lost their epoch lease (retry the open): %s",
				v.Name, v.Epoch, strings.Join(why, "; "))
		case <-tick.C:
		}
	}
}

// pendingFence is an epoch raise whose fence has not completed: the epoch
// table version it was recorded at and when.
type pendingFence struct {
	version uint64
	bumped  time.Time
}

// fenced forgets the pending fence of a volume once a fence at or past its
// version completed.
func (l *leaderState) fenced(volID, version uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f, ok := l.mu.fences[volID]; ok && f.version <= version {
		delete(l.mu.fences, volID)
	}
}

// fenceAgain completes whatever fence of v may still be pending: a retried
// unpublish or take-over that finds nothing left to change calls it,
// because the attempt that changed it may have ended (its caller's deadline)
// before its fence completed. A raise this leader recorded is waited for
// from when it was made; one an earlier leader made happened before this
// leader took over, so waiting from then is safe. When every chunkserver
// takes the push at once, it returns at once.
func (l *leaderState) fenceAgain(ctx context.Context, v *mdspb.Volume) error {
	l.mu.Lock()
	f, ok := l.mu.fences[v.Id]
	if !ok {
		f = pendingFence{version: l.mu.epochVersion, bumped: l.since}
	}
	l.mu.Unlock()
	return l.fenceEpoch(ctx, v, f.version, f.bumped)
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// updateEpochOn pushes a volume's epoch to one chunkserver.
func (l *leaderState) updateEpochOn(ctx context.Context, addr string, v *mdspb.Volume, timeout time.Duration) error {
	cc, err := l.s.conns.Get(addr)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := chunkpb.NewChunkServiceClient(cc).UpdateEpoch(cctx, &chunkpb.UpdateEpochRequest{VolumeId: v.Id, Epoch: v.Epoch})
	if err != nil {
		return err
	}
	if resp.Status != chunkpb.Status_STATUS_OK {
		return fmt.Errorf("%s: %s", resp.Status, resp.Message)
	}
	if resp.Epoch < v.Epoch {
		return fmt.Errorf("chunkserver holds epoch %d after the update to %d", resp.Epoch, v.Epoch)
	}
	return nil
}

// epochLeaseMs is the lease a heartbeat answer grants, in milliseconds.
func (l *leaderState) epochLeaseMs() uint32 {
	return uint32(l.s.cfg.EpochLease / time.Millisecond)
}
