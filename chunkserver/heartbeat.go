package chunkserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"syscall"
	"time"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/copyset"
)

// heartbeatLoop reports to the MDS every interval and acts on its answer.
func (s *Server) heartbeatLoop() {
	defer s.wg.Done()
	t := time.NewTimer(0)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		case <-s.hbKick:
			t.Stop() // reset below; no stale tick is delivered after Stop
		}
		ctx, cancel := context.WithTimeout(context.Background(), max(2*s.hbEvery, 5*time.Second))
		err := s.heartbeat(ctx)
		cancel()
		if err != nil {
			failures++
			if failures == 1 || failures%10 == 0 {
				s.log.Warn("heartbeat to the MDS failed", "err", err, "failures", failures)
			}
		} else {
			if failures > 0 {
				s.log.Info("heartbeats to the MDS resumed", "after_failures", failures)
			}
			failures = 0
		}
		t.Reset(s.hbEvery)
	}
}

// reportSoon asks for a heartbeat now: an operator ended, and the MDS
// learns it (and answers with the next step) without waiting for the
// period.
func (s *Server) reportSoon() {
	select {
	case s.hbKick <- struct{}{}:
	default:
	}
}

// heartbeat sends one heartbeat and handles the reply.
func (s *Server) heartbeat(ctx context.Context) error {
	req := &mdspb.HeartbeatRequest{
		ChunkserverId:     s.id.ChunkServerID,
		Token:             s.id.Token,
		Address:           s.addr,
		Capacity:          s.capacity(),
		EpochTableVersion: s.epochs.currentVersion(),
		Features:          []string{"clones"},
	}
	leaders := 0
	reported := map[copyset.GroupID]*copyset.Copyset{}
	for _, c := range s.engine.List() {
		sctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := c.Status(sctx)
		cancel()
		if err != nil {
			continue
		}
		if st.Role == copyset.RoleLeader {
			leaders++
		}
		req.Copysets = append(req.Copysets, &mdspb.CopysetReport{Status: s.statusProto(st)})
		reported[c.ID()] = c
	}
	s.m.copysets.Set(float64(len(req.Copysets)))
	s.m.leaders.Set(float64(leaders))
	// The lease an answer grants counts from here: the MDS answers after
	// this moment, so the lease ends no later than one the MDS measures from
	// any later moment, whatever the answer's delay.
	sent := time.Now()
	call := func(ctx context.Context) (*mdspb.HeartbeatResponse, error) {
		return s.mds.Heartbeats().Heartbeat(ctx, req)
	}
	var resp *mdspb.HeartbeatResponse
	var err error
	if k := s.cfg.TestingKnobs.InterceptHeartbeat; k != nil {
		resp, err = k(ctx, call)
	} else {
		resp, err = call(ctx)
	}
	if err != nil {
		return err
	}
	table := len(resp.GetEpochs()) > 0 || resp.GetEpochTableVersion() > req.GetEpochTableVersion()
	epochs := make(map[uint64]uint64, len(resp.GetEpochs()))
	for _, ve := range resp.GetEpochs() {
		epochs[ve.GetVolumeId()] = ve.GetEpoch()
	}
	lease := time.Duration(resp.GetEpochLeaseMs()) * time.Millisecond
	if err := s.epochs.sync(table, resp.GetEpochTableVersion(), epochs, sent, lease); err != nil {
		return fmt.Errorf("epoch table from the MDS: %w", err)
	}
	for _, op := range resp.GetOperators() {
		s.startOperator(op)
	}
	for i, ref := range resp.GetRemoveCopysets() {
		var epoch uint64
		if i < len(resp.GetRemoveConfEpochs()) {
			epoch = resp.GetRemoveConfEpochs()[i]
		}
		if c := reported[copyset.MakeGroupID(ref.GetLogicalPoolId(), ref.GetCopysetId())]; c != nil {
			s.removeCopyset(c, epoch)
		}
	}
	if lease <= 0 {
		return errors.New("the MDS granted no epoch lease (an MDS older than this chunkserver?): epoch-checked requests stay refused")
	}
	return nil
}

// capacity reports the disk and the pool.
func (s *Server) capacity() *mdspb.Capacity {
	c := &mdspb.Capacity{}
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.cfg.DataDir, &st); err == nil {
		c.DiskTotalBytes = st.Blocks * uint64(st.Bsize)
		c.DiskFreeBytes = st.Bavail * uint64(st.Bsize)
	}
	if s.pool != nil {
		ps := s.pool.Stats()
		c.PoolFreeChunks = uint64(ps.Clean)
		c.PoolUsedChunks = uint64(ps.InUse)
		c.PoolTargetChunks = uint64(ps.Target)
		c.FormatPercent = uint32(ps.FormatPercent)
		c.PoolGrowableChunks = uint64(ps.Growable)
	}
	if s.engine == nil {
		return c // registering: no copyset is open yet
	}
	for _, cs := range s.engine.List() {
		if k, ok := cs.Store().(interface{ KeptStats() (int, int64) }); ok {
			files, kept := k.KeptStats()
			c.SnapshotFiles += uint64(files)
			c.SnapshotKeptBytes += uint64(kept)
		}
	}
	return c
}

// removeCopyset moves a replica the MDS no longer places here to the trash,
// unless its own configuration at the MDS's conf epoch or later still names
// this chunkserver, or another replica took its place since the heartbeat
// reported it (a broken one replaced by an empty one being rebuilt: the
// answer was about the broken one).
func (s *Server) removeCopyset(c *copyset.Copyset, mdsEpoch uint64) {
	id := c.ID()
	// A broken replica stopped applying, and one whose configuration is
	// older than the MDS's was removed while it could not apply that (it
	// was down, or a learner given up): their own configuration is stale,
	// and the MDS's word that the copyset went on without them is enough.
	cs := c.ConfState()
	stale := c.Broken() != nil || c.ConfEpoch() < mdsEpoch
	if !stale && (slices.Contains(cs.GetVoters(), s.id.ChunkServerID) || slices.Contains(cs.GetLearners(), s.id.ChunkServerID)) {
		s.log.Warn("MDS asked to remove a copyset whose configuration still includes this chunkserver; keeping it", "copyset", id)
		return
	}
	switch err := s.engine.RemoveReplica(c); {
	case errors.Is(err, copyset.ErrReplaced), errors.Is(err, copyset.ErrNotFound):
	case err != nil:
		s.log.Error("removing copyset", "copyset", id, "err", err)
	}
}
