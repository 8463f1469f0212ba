package ops

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
	"cairn.io/cairn/mds/mdsclient"
)

// statusResult is the output of `status`.
type statusResult struct {
	Healthy          bool              `json:"healthy"`
	Problems         []string          `json:"problems"`
	MDS              []mdsView         `json:"mds"`
	Etcd             []etcdView        `json:"etcd"`
	ChunkServers     chunkServerCounts `json:"chunkservers"`
	LogicalPools     []logicalPoolView `json:"logical_pools"`
	Copysets         copysetCounts     `json:"copysets"`
	Space            spaceView         `json:"space"`
	Formatting       formattingView    `json:"formatting"`
	Volumes          volumeCounts      `json:"volumes"`
	PendingOperators int               `json:"pending_operators"`
	Recovery         recoveryView      `json:"recovery"`

	// details holds, for each problem, the per-copyset sentences behind
	// it; showDetails prints them (status --details).
	details     [][]string
	showDetails bool
}

// addProblem appends a problem sentence with the per-copyset sentences
// behind it.
func (r *statusResult) addProblem(text string, details []string) {
	r.Problems = append(r.Problems, text)
	r.details = append(r.details, details)
}

type mdsView struct {
	Address string `json:"address"`
	// Role is leader, follower or unreachable.
	Role  string `json:"role"`
	Error string `json:"error,omitempty"`
}

type etcdView struct {
	Name       string   `json:"name"`
	ClientURLs []string `json:"client_urls"`
	Leader     bool     `json:"leader"`
}

type chunkServerCounts struct {
	Total    int `json:"total"`
	Online   int `json:"online"`
	Unstable int `json:"unstable"`
	Offline  int `json:"offline"`
	Unknown  int `json:"unknown"`
	Retired  int `json:"retired"`
}

type copysetCounts struct {
	Total     int            `json:"total"`
	Healthy   int            `json:"healthy"`
	Unhealthy int            `json:"unhealthy"`
	ByReason  map[string]int `json:"by_reason"`
	// UnhealthyCopysets lists every unhealthy copyset with its reasons.
	UnhealthyCopysets []copysetView `json:"unhealthy_copysets"`
}

type spaceView struct {
	DiskTotalBytes uint64 `json:"disk_total_bytes"`
	DiskUsedBytes  uint64 `json:"disk_used_bytes"`
	DiskFreeBytes  uint64 `json:"disk_free_bytes"`
	// Chunk file pools (raw, all replicas): formatted files in bytes of
	// chunk data.
	PoolTotalBytes uint64 `json:"pool_total_bytes"`
	PoolUsedBytes  uint64 `json:"pool_used_bytes"`
	PoolFreeBytes  uint64 `json:"pool_free_bytes"`
	// PoolGrowableBytes is what the pools may still create on demand:
	// free plus growable is what new data can take.
	PoolGrowableBytes uint64 `json:"pool_growable_bytes"`
	// Volumes (logical, before replication).
	ProvisionedBytes uint64 `json:"provisioned_bytes"`
	AllocatedBytes   uint64 `json:"allocated_bytes"`
	// Snapshots (raw, all replicas): the chunk files that keep chunks'
	// past for volume snapshots (in pool_used_bytes), and the data they
	// hold.
	SnapshotFileBytes uint64 `json:"snapshot_file_bytes"`
	SnapshotKeptBytes uint64 `json:"snapshot_kept_bytes"`
}

type formattingView struct {
	Percent          uint32 `json:"percent"`
	FormattedChunks  uint64 `json:"formatted_chunks"`
	TargetChunks     uint64 `json:"target_chunks"`
	ChunkServersBusy int    `json:"chunkservers_formatting"`
}

type volumeCounts struct {
	Total    int `json:"total"`
	Deleting int `json:"deleting"`
}

func (a *app) statusCommand() *cobra.Command {
	var maxGap uint64
	var staleAfter time.Duration
	var details bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Say whether the cluster is healthy and why not (exit 0 only when healthy)",
		Long: `status shows the MDS leader and followers, etcd members, chunkservers by state,
copysets total/healthy/unhealthy with reasons, space and chunk file pool
formatting progress, from the MDS's view. It exits 0 only when the cluster is
healthy, 3 when it is not.

Problems are grouped by cause: a chunkserver that is down, paused or behind
is one line with the copysets it troubles counted and the volumes named;
--details lists the copysets of each cause with their own sentences (check
copyset POOL:ID asks a copyset's replicas themselves).`,
		Args: exactArgs(0, "none"),
		RunE: a.runE(func(ctx context.Context, cmd *cobra.Command, args []string) error {
			res, err := a.status(ctx, healthParams{maxLogGap: maxGap, staleAfter: staleAfter, now: time.Now()})
			if err != nil {
				return err
			}
			res.showDetails = details
			if err := a.emit(res); err != nil {
				return err
			}
			if !res.Healthy {
				return verdict(ExitUnhealthy)
			}
			return nil
		}),
	}
	cmd.Flags().Uint64Var(&maxGap, "max-log-gap", 1000, "log entries a follower may trail its leader by")
	cmd.Flags().DurationVar(&staleAfter, "stale-after", 30*time.Second, "age after which a copyset leader's last report counts as lost")
	cmd.Flags().BoolVar(&details, "details", false, "under each problem, list the copysets it concerns, one sentence each")
	return cmd
}

func (a *app) status(ctx context.Context, p healthParams) (*statusResult, error) {
	cctx, cancel := a.callCtx(ctx)
	cluster, err := a.conn.Cluster().GetClusterStatus(cctx, &mdspb.GetClusterStatusRequest{})
	cancel()
	if err != nil {
		return nil, rpcErr("get cluster status", err)
	}
	topo, err := a.fetchTopology(ctx)
	if err != nil {
		return nil, err
	}
	copysets, err := a.listCopysets(ctx, 0)
	if err != nil {
		return nil, err
	}
	cctx, cancel = a.callCtx(ctx)
	defer cancel()
	vols, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
	if err != nil {
		return nil, rpcErr("list volumes", err)
	}
	ops, err := a.conn.Cluster().ListOperators(cctx, &mdspb.ListOperatorsRequest{})
	if err != nil {
		return nil, rpcErr("list operators", err)
	}

	res := &statusResult{Problems: []string{}, PendingOperators: len(ops.Operators)}
	problem := func(format string, args ...any) { res.addProblem(fmt.Sprintf(format, args...), nil) }
	// Chunkservers and copysets: their problems are reported grouped by
	// cause, once the volumes are known.
	var grouped causes

	// MDS: the election's view, plus every address the operator named.
	res.MDS = a.probeMDS(ctx, cluster.Mds)
	for _, m := range res.MDS {
		if m.Role == "unreachable" {
			problem("MDS %s does not answer: %s", m.Address, m.Error)
		}
	}
	etcdLeader := false
	for _, m := range cluster.Etcd {
		res.Etcd = append(res.Etcd, etcdView{Name: m.Name, ClientURLs: m.ClientUrls, Leader: m.Leader})
		etcdLeader = etcdLeader || m.Leader
	}
	if !etcdLeader {
		problem("etcd has no leader")
	}

	// Chunkservers, space and formatting.
	chunkSize := cluster.GetConstants().GetChunkSize()
	counts := &res.ChunkServers
	for _, cs := range topo.chunkservers {
		counts.Total++
		if cs.RwState == mdspb.RWState_RW_STATE_RETIRED {
			counts.Retired++
		}
		state := onlineStateName(cs.OnlineState)
		switch cs.OnlineState {
		case mdspb.OnlineState_ONLINE_STATE_ONLINE:
			counts.Online++
		case mdspb.OnlineState_ONLINE_STATE_UNSTABLE:
			counts.Unstable++
		case mdspb.OnlineState_ONLINE_STATE_OFFLINE:
			counts.Offline++
		default:
			counts.Unknown++
			state = "unknown (no heartbeat since the MDS leader took over)"
		}
		// A retired chunkserver is expected to be gone (a replaced disk, a
		// drained machine).
		if cs.OnlineState != mdspb.OnlineState_ONLINE_STATE_ONLINE && cs.RwState != mdspb.RWState_RW_STATE_RETIRED {
			grouped.chunkserver(cs.Id, state)
		}
		if cs.OnlineState == mdspb.OnlineState_ONLINE_STATE_OFFLINE {
			continue
		}
		c := cs.GetCapacity()
		res.Space.DiskTotalBytes += c.GetDiskTotalBytes()
		res.Space.DiskFreeBytes += c.GetDiskFreeBytes()
		formatted := c.GetPoolFreeChunks() + c.GetPoolUsedChunks()
		res.Space.PoolUsedBytes += c.GetPoolUsedChunks() * chunkSize
		res.Space.PoolFreeBytes += c.GetPoolFreeChunks() * chunkSize
		res.Space.PoolGrowableBytes += c.GetPoolGrowableChunks() * chunkSize
		res.Space.SnapshotFileBytes += c.GetSnapshotFiles() * chunkSize
		res.Space.SnapshotKeptBytes += c.GetSnapshotKeptBytes()
		res.Formatting.FormattedChunks += formatted
		target := max(c.GetPoolTargetChunks(), formatted)
		res.Formatting.TargetChunks += target
		if formatted < target {
			res.Formatting.ChunkServersBusy++
		}
	}
	if counts.Total == 0 {
		problem("no chunkserver is registered")
	}
	res.Space.DiskUsedBytes = res.Space.DiskTotalBytes - min(res.Space.DiskFreeBytes, res.Space.DiskTotalBytes)
	res.Space.PoolTotalBytes = res.Space.PoolUsedBytes + res.Space.PoolFreeBytes
	res.Formatting.Percent = percent(res.Formatting.FormattedChunks, res.Formatting.TargetChunks)

	// Logical pools.
	physNames := map[uint32]string{}
	for _, pp := range topo.physical {
		physNames[pp.Id] = pp.Name
	}
	replicas := map[uint32]uint32{}
	for _, lp := range topo.logical {
		res.LogicalPools = append(res.LogicalPools, newLogicalPoolView(lp, physNames))
		replicas[lp.Id] = lp.Replicas
		if lp.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
			problem("logical pool %q is still being created: not every chunkserver has created its copysets", lp.Name)
		}
	}
	if len(topo.logical) == 0 {
		problem("no logical pool exists (create one with: cairn-ops create pool)")
	}

	cc := &res.Copysets
	cc.ByReason = map[string]int{}
	cc.UnhealthyCopysets = []copysetView{}
	for _, c := range copysets {
		cc.Total++
		h := mdsCopysetHealth(c, replicas[c.Id.GetLogicalPoolId()], topo.csByID, p)
		if h.ok() {
			cc.Healthy++
			continue
		}
		cc.Unhealthy++
		for _, r := range h.reasons {
			cc.ByReason[r]++
		}
		cc.UnhealthyCopysets = append(cc.UnhealthyCopysets, newCopysetView(c, h))
		grouped.add(c.Id, h.findings)
	}

	// Recovery, drains and space: drains and space are reported after the
	// causes.
	var later []string
	blocked, err := a.addRecovery(ctx, res, topo, func(format string, args ...any) { later = append(later, fmt.Sprintf(format, args...)) })
	if err != nil {
		return nil, err
	}
	grouped.blocked = blocked

	// Volumes.
	for _, v := range vols.Volumes {
		res.Volumes.Total++
		if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_DELETING {
			res.Volumes.Deleting++
		}
		res.Space.ProvisionedBytes += v.Size
		res.Space.AllocatedBytes += v.AllocatedSegments * v.SegmentSize
	}

	for _, l := range a.reportCauses(ctx, &grouped, topo, vols.Volumes) {
		res.addProblem(l.text, l.details)
	}
	for _, p := range later {
		problem("%s", p)
	}

	res.Healthy = len(res.Problems) == 0
	return res, nil
}

// probeMDS asks every MDS known (from the election and from --mds) directly
// whether it answers, and as what.
func (a *app) probeMDS(ctx context.Context, elected []*mdspb.MDSInstance) []mdsView {
	var addrs []string
	for _, m := range elected {
		if m.Address != "" && !slices.Contains(addrs, m.Address) {
			addrs = append(addrs, m.Address)
		}
	}
	for _, addr := range a.mdsAddrs {
		if !slices.Contains(addrs, addr) {
			addrs = append(addrs, addr)
		}
	}
	out := make([]mdsView, len(addrs))
	var wg sync.WaitGroup
	for i, addr := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = a.probeOneMDS(ctx, addr)
		}()
	}
	wg.Wait()
	sort.SliceStable(out, func(i, j int) bool {
		return out[i].Role == "leader" && out[j].Role != "leader"
	})
	return out
}

func (a *app) probeOneMDS(ctx context.Context, addr string) mdsView {
	v := mdsView{Address: addr}
	cc, err := grpc.NewClient(addr, certs.DialOption(a.identity, certs.RoleMDS))
	if err != nil {
		v.Role, v.Error = "unreachable", err.Error()
		return v
	}
	defer cc.Close()
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	_, err = mdspb.NewClusterServiceClient(cc).GetClusterStatus(cctx, &mdspb.GetClusterStatusRequest{})
	if err == nil {
		v.Role = "leader"
		return v
	}
	if _, ok := mdsclient.NotLeaderAddress(err); ok {
		v.Role = "follower"
		return v
	}
	v.Role, v.Error = "unreachable", errorMessage(err)
	return v
}

func newLogicalPoolView(lp *mdspb.LogicalPool, physNames map[uint32]string) logicalPoolView {
	return logicalPoolView{
		ID: lp.Id, Name: lp.Name, PhysicalPoolID: lp.PhysicalPoolId, PhysicalPool: physNames[lp.PhysicalPoolId],
		Status: poolStatusName(lp.Status), Replicas: lp.Replicas, Copysets: lp.CopysetCount,
		CopysetsPerChunkserver: lp.CopysetsPerChunkserver,
	}
}

func newCopysetView(c *mdspb.Copyset, h *health) copysetView {
	v := copysetView{
		Copyset: c.Id.Name(), LogicalPoolID: c.Id.GetLogicalPoolId(), CopysetID: c.Id.GetCopysetId(),
		LeaderID: c.LeaderId, Peers: newPeerViews(c.Peers), ConfEpoch: c.ConfEpoch, Term: c.Term,
		AppliedIndex: c.AppliedIndex, ReportedUnix: c.ReportedUnix,
		Healthy: h.ok(), Reasons: []string{}, Problems: []string{},
	}
	v.Reasons = append(v.Reasons, h.reasons...)
	v.Problems = append(v.Problems, h.problems...)
	return v
}

func (r *statusResult) writeTable(t *table) {
	if r.Healthy {
		t.line("cluster is HEALTHY")
	} else {
		t.line("cluster is NOT HEALTHY: %d problem(s)", len(r.Problems))
	}
	t.line("")
	var mds []string
	for _, m := range r.MDS {
		mds = append(mds, fmt.Sprintf("%s (%s)", m.Address, m.Role))
	}
	t.row("mds:", strings.Join(mds, ", "))
	var etcd []string
	for _, m := range r.Etcd {
		role := "follower"
		if m.Leader {
			role = "leader"
		}
		etcd = append(etcd, fmt.Sprintf("%s %s (%s)", m.Name, strings.Join(m.ClientURLs, ","), role))
	}
	t.row("etcd:", dash(strings.Join(etcd, ", ")))
	c := r.ChunkServers
	t.row("chunkservers:", fmt.Sprintf("%d total: %d online, %d unstable, %d offline, %d unknown, %d retired",
		c.Total, c.Online, c.Unstable, c.Offline, c.Unknown, c.Retired))
	var pools []string
	for _, p := range r.LogicalPools {
		pools = append(pools, fmt.Sprintf("%s (id %d, %s): %s, %d copysets", p.Name, p.ID, p.PhysicalPool, p.Status, p.Copysets))
	}
	t.row("logical pools:", dash(strings.Join(pools, "; ")))
	cs := r.Copysets
	line := fmt.Sprintf("%d total, %d healthy, %d unhealthy", cs.Total, cs.Healthy, cs.Unhealthy)
	if len(cs.ByReason) > 0 {
		reasons := make([]string, 0, len(cs.ByReason))
		for k, n := range cs.ByReason {
			reasons = append(reasons, fmt.Sprintf("%s %d", k, n))
		}
		sort.Strings(reasons)
		line += " (" + strings.Join(reasons, ", ") + ")"
	}
	t.row("copysets:", line)
	s := r.Space
	t.row("disk:", fmt.Sprintf("%s total, %s used, %s free", formatBytes(s.DiskTotalBytes), formatBytes(s.DiskUsedBytes), formatBytes(s.DiskFreeBytes)))
	t.row("chunk files:", fmt.Sprintf("%s formatted (%s used, %s free), %s more may be formatted on demand",
		formatBytes(s.PoolTotalBytes), formatBytes(s.PoolUsedBytes), formatBytes(s.PoolFreeBytes), formatBytes(s.PoolGrowableBytes)))
	t.row("volumes:", fmt.Sprintf("%d (%d being deleted), %s provisioned, %s allocated",
		r.Volumes.Total, r.Volumes.Deleting, formatBytes(s.ProvisionedBytes), formatBytes(s.AllocatedBytes)))
	if s.SnapshotFileBytes > 0 {
		t.row("snapshots:", fmt.Sprintf("%s of chunk files keep %s of data for volume snapshots", formatBytes(s.SnapshotFileBytes), formatBytes(s.SnapshotKeptBytes)))
	}
	f := r.Formatting
	format := fmt.Sprintf("%d%% (%d of %d chunk files)", f.Percent, f.FormattedChunks, f.TargetChunks)
	if f.ChunkServersBusy > 0 {
		format += fmt.Sprintf(", %d chunkserver(s) still formatting", f.ChunkServersBusy)
	}
	t.row("formatting:", format)
	t.row("operators:", fmt.Sprintf("%d pending", r.PendingOperators))
	t.row("recovery:", r.Recovery.line())
	if len(r.Problems) == 0 {
		return
	}
	t.line("")
	t.line("problems:")
	grouped := false
	for i, p := range r.Problems {
		t.line("  - %s", p)
		if i >= len(r.details) {
			continue
		}
		grouped = grouped || len(r.details[i]) > 0
		if r.showDetails {
			for _, d := range r.details[i] {
				t.line("      %s", d)
			}
		}
	}
	if grouped && !r.showDetails {
		t.line("")
		t.line("one line per cause; each copyset's own problem: cairn-ops status --details; what its replicas say: cairn-ops check copyset POOL:ID")
	}
}
