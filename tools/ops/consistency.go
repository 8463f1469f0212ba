package ops

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/chunkpb"
	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
)

// Verdicts on a chunk.
const (
	chunkConsistent = "consistent"
	chunkMismatch   = "mismatch"
	chunkUnverified = "unverified"
)

// consistencyParams tune check consistency.
type consistencyParams struct {
	parallel int
	// retries is how often a chunk is asked again when its replicas are at
	// different applied indexes (writes in flight) or a call failed.
	retries  int
	interval time.Duration
	// snapshots are the volume's readable snapshots: each replica hashes
	// what they read of the chunk too.
	snapshots []uint64
}

// replicaHash is one replica's answer about a chunk.
type replicaHash struct {
	ChunkserverID uint64 `json:"chunkserver_id"`
	Address       string `json:"address"`
	Exists        bool   `json:"exists"`
	AppliedIndex  uint64 `json:"applied_index"`
	// KeptBytes is what the replica keeps of the chunk for snapshots.
	KeptBytes uint64 `json:"kept_bytes,omitempty"`
	// CRC32C is the Castagnoli CRC of the whole chunk (zeros where never
	// written); 0 when not hashed.
	CRC32C uint32 `json:"crc32c"`
	// Differs marks the replicas that disagree with the majority.
	Differs bool   `json:"differs"`
	Error   string `json:"error,omitempty"`
}

// chunkReport is the verdict on one chunk that is not consistent.
type chunkReport struct {
	ChunkID       uint64        `json:"chunk_id"`
	Copyset       string        `json:"copyset"`
	LogicalPoolID uint32        `json:"logical_pool_id"`
	CopysetID     uint32        `json:"copyset_id"`
	VolumeOffset  uint64        `json:"volume_offset"`
	Status        string        `json:"status"`
	Problem       string        `json:"problem"`
	Replicas      []replicaHash `json:"replicas"`
}

type consistencyResult struct {
	Volume   string `json:"volume"`
	VolumeID uint64 `json:"volume_id"`
	Segments int    `json:"segments"`
	Chunks   int    `json:"chunks"`
	// Snapshots is how many of the volume's snapshots were compared too.
	Snapshots  int           `json:"snapshots"`
	Consistent int           `json:"consistent"`
	Mismatched int           `json:"mismatched"`
	Unverified int           `json:"unverified"`
	Problems   []chunkReport `json:"problems"`
}

func (a *app) checkConsistencyCommand() *cobra.Command {
	p := consistencyParams{}
	cmd := &cobra.Command{
		Use:   "consistency VOLUME",
		Short: "Compare every allocated chunk of a volume across its replicas (applied index, then CRC32C)",
		Long: `check consistency visits every allocated chunk of a volume. For each it asks all
replicas for their applied index and, once they agree, for the CRC32C of the
whole chunk, and compares the CRCs. Replicas at different applied indexes
(writes in flight) are asked again up to --retries times. A progress bar runs on
stderr when it is a terminal.

Exit 0 when every chunk is consistent, 4 when some replicas differ (the report
names each chunk and the replicas that disagree with the majority), 3 when
some chunks could not be verified.`,
		Args: exactArgs(1, "VOLUME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			if p.parallel < 1 || p.retries < 0 {
				return usageError(fmt.Errorf("--parallel must be at least 1 and --retries not negative"))
			}
			res, err := a.checkConsistency(ctx, args[0], p)
			if err != nil {
				return err
			}
			if err := a.emit(res); err != nil {
				return err
			}
			switch {
			case res.Mismatched > 0:
				return verdict(ExitInconsistent)
			case res.Unverified > 0:
				return verdict(ExitUnhealthy)
			}
			return nil
		}),
	}
	cmd.Flags().IntVar(&p.parallel, "parallel", 4, "chunks checked at once")
	cmd.Flags().IntVar(&p.retries, "retries", 10, "times a chunk is asked again while its replicas' applied indexes differ")
	cmd.Flags().DurationVar(&p.interval, "retry-interval", 200*time.Millisecond, "pause before asking a chunk again")
	return cmd
}

// chunkTask is one allocated chunk to check.
type chunkTask struct {
	chunkID uint64
	copyset *mdspb.Copyset
	offset  uint64
}

// volumeChunks lists a volume's chunks (those of its allocated segments)
// with their copysets and offsets.
func (a *app) volumeChunks(ctx context.Context, name string) (*mdspb.Volume, int, []chunkTask, error) {
	st, err := a.statVolume(ctx, name)
	if err != nil {
		return nil, 0, nil, err
	}
	v := st.Volume
	cctx, cancel := a.callCtx(ctx)
	segs, err := a.conn.Volumes().ListSegments(cctx, &mdspb.ListSegmentsRequest{Name: name})
	cancel()
	if err != nil {
		return nil, 0, nil, rpcErr(fmt.Sprintf("list segments of volume %q", name), err)
	}
	var refs []*commonpb.CopysetRef
	seen := map[uint64]bool{}
	for _, s := range segs.Segments {
		for _, c := range s.Chunks {
			if k := c.Copyset.Key(); !seen[k] {
				seen[k] = true
				refs = append(refs, c.Copyset)
			}
		}
	}
	copysets, err := a.getCopysets(ctx, refs)
	if err != nil {
		return nil, 0, nil, err
	}
	var tasks []chunkTask
	for _, s := range segs.Segments {
		for i, c := range s.Chunks {
			tasks = append(tasks, chunkTask{chunkID: c.ChunkId, copyset: copysets[c.Copyset.Key()], offset: s.Offset + uint64(i)*v.ChunkSize})
		}
	}
	return v, len(segs.Segments), tasks, nil
}

func (a *app) checkConsistency(ctx context.Context, name string, p consistencyParams) (*consistencyResult, error) {
	v, nsegs, tasks, err := a.volumeChunks(ctx, name)
	if err != nil {
		return nil, err
	}
	res := &consistencyResult{Volume: v.Name, VolumeID: v.Id, Segments: nsegs, Chunks: len(tasks), Problems: []chunkReport{}}
	for _, s := range v.Snapshots {
		if s.Status == mdspb.SnapshotStatus_SNAPSHOT_STATUS_READY {
			p.snapshots = append(p.snapshots, s.Seq)
			res.Snapshots++
		}
	}

	var mu sync.Mutex
	a.forEachChunk(ctx, tasks, p.parallel, fmt.Sprintf("checking %s", name), func(t chunkTask) {
		rep := a.checkChunk(ctx, t, p)
		mu.Lock()
		defer mu.Unlock()
		switch rep.Status {
		case chunkConsistent:
			res.Consistent++
		case chunkMismatch:
			res.Mismatched++
			res.Problems = append(res.Problems, rep)
		default:
			res.Unverified++
			res.Problems = append(res.Problems, rep)
		}
	})
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("check consistency of volume %q: %w", name, err)
	}
	sort.Slice(res.Problems, func(i, j int) bool { return res.Problems[i].VolumeOffset < res.Problems[j].VolumeOffset })
	return res, nil
}

// forEachChunk runs fn on every task, parallel at a time, with a progress
// bar on a terminal; it returns when all ran or ctx ended (the caller checks
// ctx).
func (a *app) forEachChunk(ctx context.Context, tasks []chunkTask, parallel int, desc string, fn func(chunkTask)) {
	bar := a.progressBar(len(tasks), desc)
	work := make(chan chunkTask)
	var wg sync.WaitGroup
	for range min(max(parallel, 1), max(len(tasks), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for t := range work {
				fn(t)
				if bar != nil {
					_ = bar.Add(1)
				}
			}
		}()
	}
feed:
	for _, t := range tasks {
		select {
		case work <- t:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if bar != nil {
		_ = bar.Finish()
		fmt.Fprintln(a.stderr)
	}
}

// checkChunk compares one chunk's replicas: applied indexes first, then,
// once they agree, the CRC32C of the whole chunk.
func (a *app) checkChunk(ctx context.Context, t chunkTask, p consistencyParams) chunkReport {
	rep := chunkReport{ChunkID: t.chunkID, VolumeOffset: t.offset, Replicas: []replicaHash{}}
	if t.copyset == nil {
		rep.Status, rep.Problem = chunkUnverified, "the MDS has no record of the chunk's copyset"
		return rep
	}
	rep.Copyset = t.copyset.Id.Name()
	rep.LogicalPoolID, rep.CopysetID = t.copyset.Id.GetLogicalPoolId(), t.copyset.Id.GetCopysetId()
	if len(t.copyset.Peers) == 0 {
		rep.Status, rep.Problem = chunkUnverified, "the copyset has no members"
		return rep
	}
	for attempt := 0; ; attempt++ {
		last := attempt >= p.retries
		infos := a.fanOut(ctx, t, chunkInfoProbe(t))
		if problem := replicaErrors(infos); problem != "" {
			if last {
				return finish(rep, infos, chunkUnverified, problem)
			}
			if sleepCtx(ctx, p.interval) != nil {
				return finish(rep, infos, chunkUnverified, problem)
			}
			continue
		}
		if problem := appliedDiffer(infos); problem != "" {
			if last || sleepCtx(ctx, p.interval) != nil {
				return finish(rep, infos, chunkUnverified, problem+fmt.Sprintf(" after %d tries (writes in flight or a lagging replica)", attempt+1))
			}
			continue
		}
		anyExists := false
		for _, r := range infos {
			anyExists = anyExists || r.Exists
		}
		if !anyExists {
			return finish(rep, infos, chunkConsistent, "")
		}
		hashes := a.fanOut(ctx, t, func(ctx context.Context, c chunkpb.ChunkServiceClient, r *replicaHash) error {
			resp, err := c.GetChunkHash(ctx, &chunkpb.GetChunkHashRequest{Copyset: t.copyset.Id, ChunkId: t.chunkID, Snapshots: p.snapshots})
			if err != nil {
				return rpcErr("get chunk hash", err)
			}
			switch resp.Status {
			case chunkpb.Status_STATUS_OK, chunkpb.Status_STATUS_CHUNK_NOTEXIST:
				r.Exists = resp.Exists && resp.Status == chunkpb.Status_STATUS_OK
				r.AppliedIndex, r.CRC32C = resp.AppliedIndex, resp.Crc32C
				return nil
			default:
				return chunkStatusError(resp.Status, resp.Message)
			}
		})
		if problem := replicaErrors(hashes); problem != "" {
			if last || sleepCtx(ctx, p.interval) != nil {
				return finish(rep, hashes, chunkUnverified, problem)
			}
			continue
		}
		if problem := appliedDiffer(hashes); problem != "" {
			// A write landed between the two rounds; hashes taken at
			// different indexes are not comparable.
			if last || sleepCtx(ctx, p.interval) != nil {
				return finish(rep, hashes, chunkUnverified, problem+fmt.Sprintf(" after %d tries (writes in flight or a lagging replica)", attempt+1))
			}
			continue
		}
		if problem := crcDiffer(hashes); problem != "" {
			return finish(rep, hashes, chunkMismatch, problem)
		}
		return finish(rep, hashes, chunkConsistent, "")
	}
}

func finish(rep chunkReport, rs []replicaHash, status, problem string) chunkReport {
	rep.Status, rep.Problem = status, problem
	rep.Replicas = rs
	return rep
}

func chunkStatusError(st chunkpb.Status, msg string) error {
	name := strings.ToLower(strings.TrimPrefix(st.String(), "STATUS_"))
	if msg != "" {
		return fmt.Errorf("%s: %s", name, msg)
	}
	return fmt.Errorf("%s", name)
}

// fanOut calls fn on every replica of the chunk's copyset in parallel.
func (a *app) fanOut(ctx context.Context, t chunkTask, fn func(context.Context, chunkpb.ChunkServiceClient, *replicaHash) error) []replicaHash {
	out := make([]replicaHash, len(t.copyset.Peers))
	var wg sync.WaitGroup
	for i, peer := range t.copyset.Peers {
		out[i] = replicaHash{ChunkserverID: peer.ChunkserverId, Address: peer.Address}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := a.cs.chunk(peer.Address)
			if err == nil {
				cctx, cancel := a.callCtx(ctx)
				err = fn(cctx, c, &out[i])
				cancel()
			}
			if err != nil {
				out[i].Error = errorMessage(err)
			}
		}()
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool { return out[i].ChunkserverID < out[j].ChunkserverID })
	return out
}

func replicaErrors(rs []replicaHash) string {
	var parts []string
	for _, r := range rs {
		if r.Error != "" {
			parts = append(parts, fmt.Sprintf("chunkserver %d (%s): %s", r.ChunkserverID, r.Address, r.Error))
		}
	}
	return strings.Join(parts, "; ")
}

func appliedDiffer(rs []replicaHash) string {
	for _, r := range rs[1:] {
		if r.AppliedIndex != rs[0].AppliedIndex {
			parts := make([]string, len(rs))
			for i, x := range rs {
				parts[i] = fmt.Sprintf("chunkserver %d at %d", x.ChunkserverID, x.AppliedIndex)
			}
			return "replicas are at different applied indexes: " + strings.Join(parts, ", ")
		}
	}
	return ""
}

// crcDiffer marks the replicas whose CRC differs from the majority's (all
// of them when there is no majority) and describes the difference.
func crcDiffer(rs []replicaHash) string {
	counts := map[uint32]int{}
	for _, r := range rs {
		counts[r.CRC32C]++
	}
	if len(counts) == 1 {
		return ""
	}
	var majority uint32
	best := 0
	for crc, n := range counts {
		if n > best || (n == best && crc < majority) {
			majority, best = crc, n
		}
	}
	hasMajority := best*2 > len(rs)
	var odd []string
	for i := range rs {
		if !hasMajority || rs[i].CRC32C != majority {
			rs[i].Differs = true
			odd = append(odd, fmt.Sprintf("chunkserver %d (%s) has crc32c %08x", rs[i].ChunkserverID, rs[i].Address, rs[i].CRC32C))
		}
	}
	if hasMajority {
		return fmt.Sprintf("%s; the other %d replica(s) have %08x", strings.Join(odd, ", "), best, majority)
	}
	return "no two replicas agree: " + strings.Join(odd, ", ")
}

func (r *consistencyResult) writeTable(t *table) {
	verdict := "CONSISTENT"
	switch {
	case r.Mismatched > 0:
		verdict = "INCONSISTENT"
	case r.Unverified > 0:
		verdict = "NOT VERIFIED"
	}
	t.line("volume %q: %s", r.Volume, verdict)
	snaps := ""
	if r.Snapshots > 0 {
		snaps = fmt.Sprintf(" (data and %d snapshot(s) compared)", r.Snapshots)
	}
	t.line("%d chunks in %d segments: %d consistent, %d mismatched, %d unverified%s",
		r.Chunks, r.Segments, r.Consistent, r.Mismatched, r.Unverified, snaps)
	if len(r.Problems) == 0 {
		return
	}
	t.line("")
	t.row("CHUNK", "COPYSET", "VOLUME OFFSET", "STATUS", "PROBLEM")
	for _, p := range r.Problems {
		t.row(p.ChunkID, dash(p.Copyset), p.VolumeOffset, p.Status, p.Problem)
	}
}

// chunkInfoProbe asks one replica whether it holds the chunk of t and at
// which applied index (for fanOut).
func chunkInfoProbe(t chunkTask) func(ctx context.Context, c chunkpb.ChunkServiceClient, r *replicaHash) error {
	return func(ctx context.Context, c chunkpb.ChunkServiceClient, r *replicaHash) error {
		resp, err := c.GetChunkInfo(ctx, &chunkpb.GetChunkInfoRequest{Copyset: t.copyset.Id, ChunkId: t.chunkID, AnyReplica: true})
		if err != nil {
			return rpcErr("get chunk info", err)
		}
		switch resp.Status {
		case chunkpb.Status_STATUS_OK, chunkpb.Status_STATUS_CHUNK_NOTEXIST:
			r.Exists = resp.Exists && resp.Status == chunkpb.Status_STATUS_OK
			r.AppliedIndex, r.KeptBytes = resp.AppliedIndex, resp.KeptBytes
			return nil
		default:
			return chunkStatusError(resp.Status, resp.Message)
		}
	}
}
