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

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
)

// chunkserverFanout bounds how many chunkservers are asked at once.
const chunkserverFanout = 8

func (a *app) checkCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check copysets against their replicas, or a volume's replicas against each other",
	}
	cmd.AddCommand(a.checkCopysetCommand(), a.checkConsistencyCommand())
	return cmd
}

// replicaStatus is one member's answer about a copyset.
type replicaStatus struct {
	ChunkserverID uint64 `json:"chunkserver_id"`
	Address       string `json:"address"`
	// Reachable is false when the chunkserver did not answer.
	Reachable bool `json:"reachable"`
	// Hosted is false when the chunkserver answered that it does not host
	// the copyset.
	Hosted             bool     `json:"hosted"`
	Error              string   `json:"error,omitempty"`
	Role               string   `json:"role"`
	LeaderID           uint64   `json:"leader_id"`
	Term               uint64   `json:"term"`
	ConfEpoch          uint64   `json:"conf_epoch"`
	Peers              []uint64 `json:"peers"`
	CommitIndex        uint64   `json:"commit_index"`
	AppliedIndex       uint64   `json:"applied_index"`
	FirstLogIndex      uint64   `json:"first_log_index"`
	LastLogIndex       uint64   `json:"last_log_index"`
	InstallingSnapshot bool     `json:"installing_snapshot"`
	Chunks             uint64   `json:"chunks"`
}

// copysetCheck is the verdict on one copyset from its replicas.
type copysetCheck struct {
	Copyset       string `json:"copyset"`
	LogicalPoolID uint32 `json:"logical_pool_id"`
	CopysetID     uint32 `json:"copyset_id"`
	Healthy       bool   `json:"healthy"`
	LeaderID      uint64 `json:"leader_id"`
	ConfEpoch     uint64 `json:"conf_epoch"`
	// AppliedIndexGap is the largest difference between the replicas'
	// applied indexes.
	AppliedIndexGap uint64          `json:"applied_index_gap"`
	Reasons         []string        `json:"reasons"`
	Problems        []string        `json:"problems"`
	Replicas        []replicaStatus `json:"replicas"`
}

type copysetCheckResult struct {
	Healthy   bool           `json:"healthy"`
	Total     int            `json:"total"`
	Unhealthy int            `json:"unhealthy"`
	Copysets  []copysetCheck `json:"copysets"`
	single    bool
}

func (a *app) checkCopysetCommand() *cobra.Command {
	var pool, copyset string
	var maxGap uint64
	cmd := &cobra.Command{
		Use:   "copyset [ID | --copyset ID]",
		Short: "Ask every replica of one copyset (or all) for its state: members, leader, applied index gap",
		Long: `check copyset asks each member chunkserver for its own view of the copyset and
checks that every member answers and hosts it, that exactly one leader exists
and the replicas agree on it, that the replicas and the MDS agree on the
configuration, that no replica is installing a snapshot, and that applied
indexes are within --max-log-gap of each other. ID is POOL:COPYSET (or
COPYSET with a single logical pool or with --pool), given as the argument
or with --copyset, as update leader takes it; without it every copyset is
checked (--pool narrows that). Exit 0 when all are healthy, 3 when not.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError(fmt.Errorf("%s takes at most one argument: ID; got %d", commandName(cmd), len(args)))
			}
			return nil
		},
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			id, err := copysetArg(args, copyset)
			if err != nil {
				return err
			}
			single := id != ""
			topo, err := a.fetchTopology(ctx)
			if err != nil {
				return err
			}
			var lp *mdspb.LogicalPool
			if pool != "" {
				if lp, err = resolveLogicalPool(topo.logical, pool); err != nil {
					return err
				}
			}
			var copysets []*mdspb.Copyset
			if single {
				if lp != nil && !strings.Contains(id, ":") {
					id = fmt.Sprintf("%d:%s", lp.Id, id) // --pool P and a bare COPYSET
				}
				ref, err := parseCopysetID(id, topo.logical)
				if err != nil {
					return err
				}
				if lp != nil && ref.LogicalPoolId != lp.Id {
					return usageError(fmt.Errorf("copyset %s is not in logical pool %q (--pool)", ref.Name(), pool))
				}
				m, err := a.getCopysets(ctx, []*commonpb.CopysetRef{ref})
				if err != nil {
					return err
				}
				copysets = append(copysets, m[ref.Key()])
			} else {
				var poolID uint32
				if lp != nil {
					poolID = lp.Id
				}
				if copysets, err = a.listCopysets(ctx, poolID); err != nil {
					return err
				}
			}
			res := a.checkCopysets(ctx, copysets, topo, maxGap)
			res.single = single
			if err := a.emit(res); err != nil {
				return err
			}
			if !res.Healthy {
				return verdict(ExitUnhealthy)
			}
			return nil
		}),
	}
	cmd.Flags().StringVar(&copyset, "copyset", "", "copyset id, instead of the argument: POOL:COPYSET, or COPYSET with a single logical pool")
	cmd.Flags().StringVar(&pool, "pool", "", "only copysets of this logical pool (name or id)")
	cmd.Flags().Uint64Var(&maxGap, "max-log-gap", 1000, "applied index difference allowed between replicas")
	return cmd
}

// memberAnswers is what one chunkserver said about the copysets asked.
type memberAnswers struct {
	err      error
	statuses map[uint64]*copysetpb.CopysetStatus
	missing  map[uint64]bool
}

// checkCopysets asks each member chunkserver once about all its copysets
// and judges each copyset.
func (a *app) checkCopysets(ctx context.Context, copysets []*mdspb.Copyset, topo *topology, maxGap uint64) *copysetCheckResult {
	type member struct {
		addr string
		refs []*commonpb.CopysetRef
	}
	members := map[uint64]*member{}
	for _, c := range copysets {
		for _, p := range c.Peers {
			m := members[p.ChunkserverId]
			if m == nil {
				m = &member{addr: p.Address}
				members[p.ChunkserverId] = m
			}
			m.refs = append(m.refs, c.Id)
		}
	}
	answers := map[uint64]*memberAnswers{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, chunkserverFanout)
	for id, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			ans := a.askCopysetStatus(ctx, m.addr, m.refs)
			mu.Lock()
			answers[id] = ans
			mu.Unlock()
		}()
	}
	wg.Wait()

	replicas := map[uint32]uint32{}
	for _, lp := range topo.logical {
		replicas[lp.Id] = lp.Replicas
	}
	res := &copysetCheckResult{Copysets: []copysetCheck{}}
	for _, c := range copysets {
		chk := judgeCopyset(c, replicas[c.Id.GetLogicalPoolId()], answers, topo.csByID, maxGap)
		res.Total++
		if !chk.Healthy {
			res.Unhealthy++
		}
		res.Copysets = append(res.Copysets, chk)
	}
	res.Healthy = res.Unhealthy == 0
	return res
}

func (a *app) askCopysetStatus(ctx context.Context, addr string, refs []*commonpb.CopysetRef) *memberAnswers {
	ans := &memberAnswers{statuses: map[uint64]*copysetpb.CopysetStatus{}, missing: map[uint64]bool{}}
	client, err := a.cs.copysets(addr)
	if err != nil {
		ans.err = err
		return ans
	}
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	resp, err := client.GetCopysetStatus(cctx, &copysetpb.GetCopysetStatusRequest{Copysets: refs})
	if err != nil {
		ans.err = rpcErr("get copyset status from "+addr, err)
		return ans
	}
	for _, st := range resp.Copysets {
		ans.statuses[st.Copyset.Key()] = st
	}
	for _, r := range resp.Missing {
		ans.missing[r.Key()] = true
	}
	return ans
}

func roleName(r copysetpb.Role) string {
	switch r {
	case copysetpb.Role_ROLE_LEADER:
		return "leader"
	case copysetpb.Role_ROLE_FOLLOWER:
		return "follower"
	case copysetpb.Role_ROLE_CANDIDATE:
		return "candidate"
	case copysetpb.Role_ROLE_PRE_CANDIDATE:
		return "pre_candidate"
	case copysetpb.Role_ROLE_LEARNER:
		return "learner"
	default:
		return "unknown"
	}
}

func peerIDs(peers []*commonpb.Peer) []uint64 {
	ids := make([]uint64, 0, len(peers))
	for _, p := range peers {
		ids = append(ids, p.ChunkserverId)
	}
	slices.Sort(ids)
	return ids
}

// judgeCopyset checks one copyset from its members' answers.
func judgeCopyset(c *mdspb.Copyset, replicas uint32, answers map[uint64]*memberAnswers, byID map[uint64]*mdspb.ChunkServer, maxGap uint64) copysetCheck {
	if replicas == 0 {
		replicas = 3
	}
	key := c.Id.Key()
	h := &health{}
	chk := copysetCheck{
		Copyset: c.Id.Name(), LogicalPoolID: c.Id.GetLogicalPoolId(), CopysetID: c.Id.GetCopysetId(),
		Replicas: []replicaStatus{},
	}
	mdsPeers := peerIDs(c.Peers)
	if n := uint32(len(c.Peers)); n < replicas {
		h.add(reasonUnderReplicated, "%d of %d replicas", n, replicas)
	}
	var live []*copysetpb.CopysetStatus
	for _, p := range c.Peers {
		rs := replicaStatus{ChunkserverID: p.ChunkserverId, Address: p.Address, Peers: []uint64{}}
		ans := answers[p.ChunkserverId]
		name := csName(p.ChunkserverId, byID)
		switch {
		case ans == nil || ans.err != nil:
			msg := "not asked"
			if ans != nil {
				msg = errorMessage(ans.err)
			}
			rs.Error = msg
			h.add(reasonReplicaUnreachable, "%s did not answer: %s", name, msg)
		case ans.missing[key] || ans.statuses[key] == nil:
			rs.Reachable = true
			rs.Error = "does not host the copyset"
			h.add(reasonReplicaMissing, "%s does not host the copyset", name)
		default:
			st := ans.statuses[key]
			rs.Reachable, rs.Hosted = true, true
			rs.Role, rs.LeaderID, rs.Term, rs.ConfEpoch = roleName(st.Role), st.LeaderId, st.Term, st.ConfEpoch
			rs.Peers = peerIDs(st.Peers)
			rs.CommitIndex, rs.AppliedIndex = st.CommitIndex, st.AppliedIndex
			rs.FirstLogIndex, rs.LastLogIndex = st.FirstLogIndex, st.LastLogIndex
			rs.InstallingSnapshot, rs.Chunks = st.InstallingSnapshot, st.ChunkCount
			live = append(live, st)
			if st.InstallingSnapshot {
				h.add(reasonInstallingSnapshot, "%s is installing a snapshot", name)
			}
		}
		chk.Replicas = append(chk.Replicas, rs)
	}

	// Leadership: one leader (the newest term wins), and nobody who knows a
	// leader at that term names another.
	var leader *copysetpb.CopysetStatus
	var claimants []string
	for _, st := range live {
		if st.Role == copysetpb.Role_ROLE_LEADER {
			claimants = append(claimants, fmt.Sprint(st.ChunkserverId))
			if leader == nil || st.Term > leader.Term {
				leader = st
			}
		}
	}
	switch {
	case leader == nil && len(live) > 0:
		h.add(reasonNoLeader, "no replica is leader")
	case len(claimants) > 1:
		h.add(reasonNoLeader, "chunkservers %s all claim leadership", strings.Join(claimants, ", "))
	}
	if leader != nil {
		chk.LeaderID, chk.ConfEpoch = leader.ChunkserverId, leader.ConfEpoch
		for _, st := range live {
			if st != leader && st.Term == leader.Term && st.LeaderId != 0 && st.LeaderId != leader.ChunkserverId {
				h.add(reasonNoLeader, "%s names chunkserver %d as leader, not %d", csName(st.ChunkserverId, byID), st.LeaderId, leader.ChunkserverId)
			}
		}
		if n := uint32(len(leader.Peers)); n < replicas {
			h.add(reasonUnderReplicated, "leader's configuration has %d of %d replicas", n, replicas)
		}
		for _, pr := range leader.Progress {
			if pr.ChunkserverId == leader.ChunkserverId {
				continue
			}
			if silent(pr) {
				h.add(reasonUnderReplicated, "leader has not heard from %s for %s", csName(pr.ChunkserverId, byID), pr.Silence().Truncate(time.Second))
			}
			if strings.Contains(strings.ToLower(pr.State), "snapshot") {
				h.add(reasonInstallingSnapshot, "leader is sending a snapshot to %s", csName(pr.ChunkserverId, byID))
			}
		}
	}

	// Configuration: the same epoch and members everywhere, and the MDS's
	// members.
	for _, st := range live {
		ids := peerIDs(st.Peers)
		if !slices.Equal(ids, mdsPeers) {
			h.add(reasonConfMismatch, "%s has members %v, the MDS records %v", csName(st.ChunkserverId, byID), ids, mdsPeers)
		}
		if leader != nil && st.ConfEpoch != leader.ConfEpoch {
			h.add(reasonConfMismatch, "%s is at conf epoch %d, the leader at %d", csName(st.ChunkserverId, byID), st.ConfEpoch, leader.ConfEpoch)
		}
	}

	// Applied index gap.
	if len(live) > 0 {
		lo, hi := live[0].AppliedIndex, live[0].AppliedIndex
		var loID uint64 = live[0].ChunkserverId
		for _, st := range live[1:] {
			if st.AppliedIndex < lo {
				lo, loID = st.AppliedIndex, st.ChunkserverId
			}
			hi = max(hi, st.AppliedIndex)
		}
		chk.AppliedIndexGap = hi - lo
		if hi-lo > maxGap {
			h.add(reasonLogGap, "%s has applied %d, %d entries behind the furthest replica (allowed %d)", csName(loID, byID), lo, hi-lo, maxGap)
		}
	}
	sort.Slice(chk.Replicas, func(i, j int) bool { return chk.Replicas[i].ChunkserverID < chk.Replicas[j].ChunkserverID })
	chk.Healthy = h.ok()
	chk.Reasons = append([]string{}, h.reasons...)
	chk.Problems = append([]string{}, h.problems...)
	return chk
}

func (r *copysetCheckResult) writeTable(t *table) {
	if r.single && len(r.Copysets) == 1 {
		c := r.Copysets[0]
		state := "HEALTHY"
		if !c.Healthy {
			state = "NOT HEALTHY (" + strings.Join(c.Reasons, ", ") + ")"
		}
		t.line("copyset %s is %s", c.Copyset, state)
		t.line("leader %s, conf epoch %d, applied index gap %d", idOrDash(c.LeaderID), c.ConfEpoch, c.AppliedIndexGap)
		t.line("")
		writeReplicaTable(t, c.Replicas)
		writeProblems(t, c.Problems)
		return
	}
	state := "all HEALTHY"
	if !r.Healthy {
		state = fmt.Sprintf("%d NOT HEALTHY", r.Unhealthy)
	}
	t.line("%d copysets checked: %s", r.Total, state)
	if r.Healthy {
		return
	}
	t.line("")
	t.row("COPYSET", "LEADER", "GAP", "REASONS", "PROBLEMS")
	for _, c := range r.Copysets {
		if !c.Healthy {
			t.row(c.Copyset, idOrDash(c.LeaderID), c.AppliedIndexGap, strings.Join(c.Reasons, ","), strings.Join(c.Problems, "; "))
		}
	}
}

func writeReplicaTable(t *table, rs []replicaStatus) {
	sorted := append([]replicaStatus(nil), rs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].ChunkserverID < sorted[j].ChunkserverID })
	t.row("REPLICA", "ADDRESS", "ROLE", "TERM", "CONF EPOCH", "COMMIT", "APPLIED", "LOG", "CHUNKS", "NOTE")
	for _, r := range sorted {
		if !r.Hosted {
			t.row(r.ChunkserverID, dash(r.Address), "-", "-", "-", "-", "-", "-", "-", dash(r.Error))
			continue
		}
		note := ""
		if r.InstallingSnapshot {
			note = "installing snapshot"
		}
		t.row(r.ChunkserverID, dash(r.Address), r.Role, r.Term, r.ConfEpoch, r.CommitIndex, r.AppliedIndex,
			fmt.Sprintf("%d-%d", r.FirstLogIndex, r.LastLogIndex), r.Chunks, dash(note))
	}
}

func writeProblems(t *table, problems []string) {
	if len(problems) == 0 {
		return
	}
	t.line("")
	t.line("problems:")
	for _, p := range problems {
		t.line("  - %s", p)
	}
}
