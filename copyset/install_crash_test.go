package copyset

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"cairn.io/cairn/internal/soon"
	"cairn.io/cairn/test/faultfs"
)

// TestRestartAfterInstallBeforeCheckpointKeepsTheLog: a follower installs a
// snapshot and loses its power before the checkpoint that records it in
// raft.meta. Its restart finds the snapshot in the WAL, newer than
// raft.meta. It must record it in raft.meta before the WAL may recycle the
// segment holding it: otherwise, once that segment is recycled, a second
// power cut leaves a raft.meta that the log no longer continues, and the
// replica loses every entry it made durable since.
func TestRestartAfterInstallBeforeCheckpointKeepsTheLog(t *testing.T) {
	tc := newCrashableCluster(t, 3, 64, func(c *Config) {
		c.RetainBytes = 8 << 10
		c.CheckpointInterval = time.Hour
	})
	idle, busy := MakeGroupID(11, 1), MakeGroupID(11, 2)
	tc.create([]GroupID{idle, busy}, []uint64{1, 2, 3})
	follower := uint64(3)
	for _, id := range []GroupID{idle, busy} {
		if l := tc.leader(id); l.e.cfg.NodeID == follower {
			if err := l.TransferLeader(context.Background(), 1, l.ConfEpoch()); err != nil {
				t.Fatal(err)
			}
		}
	}
	tc.stop(follower, false, 0)
	// The idle copyset moves on and compacts its log past the follower.
	for k := range 40 {
		tc.writeRetry(idle, 1, int64(k%16)*testBlock, pattern(fmt.Sprintf("i%d|", k), testBlock))
	}
	for _, n := range tc.running() {
		c, _ := n.engine.Get(idle)
		c.requestCheckpoint()
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		st, err := tc.leader(idle).Status(context.Background())
		if err != nil {
			return err
		}
		if st.FirstIndex < 30 {
			for _, n := range tc.running() {
				c, _ := n.engine.Get(idle)
				c.requestCheckpoint()
			}
			return fmt.Errorf("leader's log still starts at %d", st.FirstIndex)
		}
		return nil
	})
	// The follower comes back, installs a snapshot, and loses its power at
	// the first sync of the idle copyset's raft.meta after it: the
	// checkpoint of the install (the one before is the sync of what the
	// copyset read at its start).
	disk := tc.disks[follower]
	if _, err := disk.CrashAtSync(`/`+idle.DirName()+`/\.?raft\.meta`, 2, faultfs.CrashOptions{}); err != nil {
		t.Fatal(err)
	}
	tc.start(follower)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	if _, err := disk.WaitCrash(ctx); err != nil {
		cancel()
		t.Fatalf("no power cut at the install's checkpoint: %v", err)
	}
	cancel()
	tc.halt(follower, true)
	c := tc.start(follower)
	cs, err := c.engine.Get(idle)
	if err != nil {
		t.Fatal(err)
	}
	installed := cs.AppliedIndex()
	if installed < 30 {
		t.Fatalf("follower restarted at applied index %d; the snapshot it installed is lost", installed)
	}
	// The WAL now counts the idle copyset checkpointed at the snapshot: it
	// may recycle the segment holding the snapshot's record. So raft.meta
	// must already say so.
	m, err := readMeta(cs.dir)
	if err != nil {
		t.Fatal(err)
	}
	if m.Applied < installed {
		t.Fatalf("raft.meta records applied index %d after the restart; the WAL's checkpoint is at the installed snapshot %d", m.Applied, installed)
	}
	for k := range 40 {
		tc.writeRetry(busy, 2, int64(k%32)*testBlock, pattern(fmt.Sprintf("b%d|", k), testBlock))
	}
	tc.stop(follower, true, 0)
	c = tc.start(follower)
	cs, err = c.engine.Get(idle)
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.Broken(); err != nil {
		t.Fatalf("idle copyset broken after the second power cut: %v", err)
	}
	if got := cs.AppliedIndex(); got < installed {
		t.Fatalf("idle copyset restarted at applied index %d, below the %d it had installed", got, installed)
	}
	tc.replicasConverge(idle, []uint64{1})
}

// TestInterruptedInstallBreaksTheReplica: a follower loses its power in
// the middle of a snapshot install, once chunk files changed. It starts
// again broken (its chunk files mix two states that replaying its log
// cannot reconcile) instead of serving them; its peers go on.
func TestInterruptedInstallBreaksTheReplica(t *testing.T) {
	tc := newCrashableCluster(t, 3, 64, func(c *Config) {
		c.RetainBytes = 8 << 10
		c.CheckpointInterval = time.Hour
	})
	id := MakeGroupID(12, 1)
	tc.create([]GroupID{id}, []uint64{1, 2, 3})
	follower := uint64(3)
	if l := tc.leader(id); l.e.cfg.NodeID == follower {
		if err := l.TransferLeader(context.Background(), 1, l.ConfEpoch()); err != nil {
			t.Fatal(err)
		}
	}
	tc.stop(follower, false, 0)
	for k := range 40 {
		tc.writeRetry(id, uint64(1+k%3), int64(k%16)*testBlock, pattern(fmt.Sprintf("i%d|", k), testBlock))
	}
	soon.Succeeds(t, 30*time.Second, func() error {
		for _, n := range tc.running() {
			c, _ := n.engine.Get(id)
			c.requestCheckpoint()
		}
		st, err := tc.leader(id).Status(context.Background())
		if err != nil {
			return err
		}
		if st.FirstIndex < 30 {
			return fmt.Errorf("leader's log still starts at %d", st.FirstIndex)
		}
		return nil
	})
	// The power goes at the first fdatasync of a chunk file the install
	// writes.
	disk := tc.disks[follower]
	if _, err := disk.CrashAtSync(`/chunks/chunk_`, 1, faultfs.CrashOptions{}); err != nil {
		t.Fatal(err)
	}
	tc.start(follower)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	if _, err := disk.WaitCrash(ctx); err != nil {
		cancel()
		t.Fatalf("no power cut during the install: %v", err)
	}
	cancel()
	tc.halt(follower, true)
	c := tc.start(follower)
	cs, err := c.engine.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.Broken(); !errors.Is(err, ErrInstallInterrupted) {
		t.Fatalf("replica after a power cut in its install: broken = %v, want ErrInstallInterrupted", err)
	}
	tc.writeRetry(id, 1, 0, pattern("after|", testBlock))
}
