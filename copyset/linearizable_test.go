package copyset

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// Each 4 KiB block is a register. Writes store a unique value repeated over
// the block; reads must return the value of a write that could be the
// latest in some linearization.
type regOp struct {
	key   uint64
	write bool
	value uint64
}

var registerModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[uint64][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(regOp).key
			byKey[k] = append(byKey[k], op)
		}
		out := make([][]porcupine.Operation, 0, len(byKey))
		for _, ops := range byKey {
			out = append(out, ops)
		}
		return out
	},
	Init: func() any { return uint64(0) },
	Step: func(state, input, output any) (bool, any) {
		in := input.(regOp)
		if in.write {
			return true, in.value
		}
		return output.(uint64) == state.(uint64), state
	},
	DescribeOperation: func(input, output any) string {
		in := input.(regOp)
		if in.write {
			return fmt.Sprintf("write(%x)", in.value)
		}
		return fmt.Sprintf("read() -> %x", output)
	},
}

func blockOf(v uint64) []byte {
	b := make([]byte, testBlock)
	for i := 0; i < testBlock; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], v)
	}
	return b
}

// valueOf decodes a block; ok is false when the block is torn.
func valueOf(b []byte) (uint64, bool) {
	v := binary.LittleEndian.Uint64(b)
	return v, bytes.Equal(b, blockOf(v))
}

func testSeed() int64 {
	if s := os.Getenv("CAIRN_SEED"); s != "" {
		if v, err := strconv.ParseInt(s, 10, 64); err == nil {
			return v
		}
	}
	return 20261122
}

// TestLinearizableUnderFaults runs concurrent clients against 3 chunkservers
// hosting many copysets while the network drops, duplicates, delays and
// reorders messages, nodes get partitioned, and chunkservers lose their
// power (their disks, faultfs mounts, lose everything not fsynced, or a
// random part of it) or stop and restart from disk, some faster than a read
// lease. The history of
// every block must be linearizable; a write whose outcome is unknown counts
// as maybe applied.
func TestLinearizableUnderFaults(t *testing.T) {
	copysets, duration := 100, 20*time.Second
	if testing.Short() {
		copysets, duration = 12, 6*time.Second
	}
	seed := testSeed()
	t.Logf("seed %d (set CAIRN_SEED to repeat)", seed)
	rng := rand.New(rand.NewSource(seed))
	tc := newCrashableCluster(t, 3, 96, func(c *Config) {
		c.TickInterval = 50 * time.Millisecond
		c.CheckpointBytes = 512 << 10
	})
	var ids []GroupID
	for i := 0; i < copysets; i++ {
		ids = append(ids, MakeGroupID(7, uint32(i)))
	}
	tc.create(ids, []uint64{1, 2, 3})
	for _, id := range ids {
		tc.leader(id)
	}
	faults := tc.faults
	faults.SetRates(0.01, 0.01, 0.05, 30*time.Millisecond)

	start := time.Now()
	now := func() int64 { return int64(time.Since(start)) }
	var hmu sync.Mutex
	var history []porcupine.Operation
	record := func(op porcupine.Operation) {
		hmu.Lock()
		history = append(history, op)
		hmu.Unlock()
	}

	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	var wg sync.WaitGroup
	const clients = 12
	for cl := 0; cl < clients; cl++ {
		crng := rand.New(rand.NewSource(seed + int64(cl) + 1))
		wg.Add(1)
		go func(cl int) {
			defer wg.Done()
			seq := uint64(0)
			for ctx.Err() == nil {
				id := ids[crng.Intn(len(ids))]
				chunk := uint64(crng.Intn(2))
				blk := uint64(crng.Intn(8))
				key := uint64(id)<<8 | chunk<<4 | blk
				var c *Copyset
				for _, n := range tc.running() {
					if cs, err := n.engine.Get(id); err == nil && cs.IsLeader() {
						c = cs
						break
					}
				}
				if c == nil {
					time.Sleep(5 * time.Millisecond)
					continue
				}
				octx, ocancel := context.WithTimeout(ctx, time.Second)
				if crng.Intn(2) == 0 {
					seq++
					v := uint64(cl+1)<<40 | seq
					call := now()
					_, err := writeWait(octx, c, chunk, 1, 1, int64(blk*testBlock), blockOf(v))
					ret := now()
					switch {
					case err == nil:
						record(porcupine.Operation{ClientId: cl, Input: regOp{key: key, write: true, value: v}, Call: call, Return: ret})
					case errors.Is(err, ErrNotLeader), errors.Is(err, ErrProposalLost):
						// Never entered the log, or lost from it: not applied.
					default:
						// Unknown outcome: may take effect at any later time.
						record(porcupine.Operation{ClientId: cl, Input: regOp{key: key, write: true, value: v}, Call: call, Return: math.MaxInt64})
					}
				} else {
					buf := make([]byte, testBlock)
					call := now()
					err := c.Read(octx, chunk, int64(blk*testBlock), buf)
					ret := now()
					if err != nil && !isNotExist(err) {
						ocancel()
						continue // a failed read observes nothing
					}
					var v uint64
					if err == nil {
						var ok bool
						if v, ok = valueOf(buf); !ok {
							t.Errorf("torn block %x: starts %x", key, buf[:16])
						}
					}
					record(porcupine.Operation{ClientId: cl, Input: regOp{key: key}, Output: v, Call: call, Return: ret})
				}
				ocancel()
			}
		}(cl)
	}

	// The nemesis: one fault at a time, each set up, held, then undone.
	nemesisDone := make(chan struct{})
	go func() {
		defer close(nemesisDone)
		for ctx.Err() == nil {
			victim := uint64(rng.Intn(3) + 1)
			hold := time.Duration(500+rng.Intn(1500)) * time.Millisecond
			switch rng.Intn(5) {
			case 0:
				t.Logf("%v: isolate %d for %v", time.Since(start).Round(time.Millisecond), victim, hold)
				faults.Isolate(victim)
				sleepCtx(ctx, hold)
				faults.Heal()
			case 1:
				keep := rng.Float64()
				t.Logf("%v: crash %d (keep %.2f), down %v", time.Since(start).Round(time.Millisecond), victim, keep, hold)
				tc.stop(victim, true, keep)
				sleepCtx(ctx, hold)
				tc.start(victim)
			case 2:
				t.Logf("%v: restart %d, down %v", time.Since(start).Round(time.Millisecond), victim, hold)
				tc.stop(victim, false, 0)
				sleepCtx(ctx, hold)
				tc.start(victim)
			case 4:
				// A restart shorter than a leader's read lease: the
				// replica must not help elect a new leader while the old
				// one may still serve reads under its lease.
				quick := time.Duration(rng.Intn(300)) * time.Millisecond
				t.Logf("%v: bounce %d (crash, back after %v)", time.Since(start).Round(time.Millisecond), victim, quick)
				tc.stop(victim, true, rng.Float64())
				sleepCtx(ctx, quick)
				tc.start(victim)
			case 3:
				other := victim%3 + 1
				t.Logf("%v: partition %d from %d for %v", time.Since(start).Round(time.Millisecond), victim, other, hold)
				faults.Partition(victim, other)
				sleepCtx(ctx, hold)
				faults.Heal()
			}
			sleepCtx(ctx, time.Duration(200+rng.Intn(500))*time.Millisecond)
		}
	}()
	wg.Wait()
	<-nemesisDone
	faults.Heal()
	faults.SetRates(0, 0, 0, 0)
	for id := uint64(1); id <= 3; id++ {
		if tc.node(id) == nil {
			tc.start(id)
		}
	}

	hmu.Lock()
	ops := history
	hmu.Unlock()
	writes, reads := 0, 0
	for _, op := range ops {
		if op.Input.(regOp).write {
			writes++
		} else {
			reads++
		}
	}
	t.Logf("history: %d writes, %d reads", writes, reads)
	if writes < 50 || reads < 50 {
		t.Fatalf("too little work got through: %d writes, %d reads", writes, reads)
	}
	res, info := porcupine.CheckOperationsVerbose(registerModel, ops, 2*time.Minute)
	if res != porcupine.Ok {
		path := t.TempDir() + "/history.html"
		if f, err := os.CreateTemp("", "cairn-linearizability-*.html"); err == nil {
			path = f.Name()
			f.Close()
		}
		_ = porcupine.VisualizePath(registerModel, info, path)
		t.Fatalf("history is %s (visualization: %s)", res, path)
	}
	// Every replica of every copyset converges to the same chunk files.
	tc.allApplied(ids, time.Minute)
	for _, id := range ids {
		tc.replicasConverge(id, []uint64{0, 1})
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
