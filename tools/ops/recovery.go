package ops

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"cairn.io/cairn/api/mdspb"
)

// recoveryView is what the schedulers are doing, in `status`.
type recoveryView struct {
	CopysetsToRepair int `json:"copysets_to_repair"`
	CopysetsMoving   int `json:"copysets_moving"`
	Blocked          int `json:"copysets_blocked"`
	// BlockedCopysets says why each blocked copyset cannot be repaired.
	BlockedCopysets []blockedView  `json:"blocked"`
	Operators       map[string]int `json:"operators_by_reason"`
	BytesToMove     uint64         `json:"bytes_to_move"`
	BytesPerSecond  float64        `json:"bytes_per_second"`
	// ETASeconds is the time left at the last minute's rate; -1 when
	// nothing finished in that minute yet.
	ETASeconds           int64  `json:"eta_seconds"`
	RetiringChunkServers int    `json:"retiring_chunkservers"`
	RecoverAfter         string `json:"recover_after"`
	BalanceEnabled       bool   `json:"balance_enabled"`
}

// blockedView is a copyset that needs a repair no chunkserver can take.
type blockedView struct {
	Copyset string `json:"copyset"`
	Reason  string `json:"reason"`
}

// addRecovery fills in the schedulers' progress and the problems it finds:
// chunkservers draining, chunkservers past the space thresholds. It returns
// the copysets no chunkserver can repair now, which status reports with
// their causes.
func (a *app) addRecovery(ctx context.Context, res *statusResult, topo *topology, problem func(string, ...any)) ([]*mdspb.BlockedCopyset, error) {
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	st, err := a.conn.Cluster().GetScheduleStatus(cctx, &mdspb.GetScheduleStatusRequest{})
	if err != nil {
		return nil, rpcErr("get schedule status", err)
	}
	r := &res.Recovery
	r.CopysetsToRepair, r.CopysetsMoving, r.Blocked = int(st.CopysetsToRepair), int(st.CopysetsMoving), len(st.Blocked)
	r.Operators = map[string]int{}
	for _, o := range st.Operators {
		r.Operators[o.Reason] = int(o.Count)
	}
	r.BytesToMove, r.BytesPerSecond, r.ETASeconds = st.BytesToMove, st.BytesPerSecond, -1
	if st.BytesPerSecond > 0 {
		r.ETASeconds = int64(float64(st.BytesToMove) / st.BytesPerSecond)
	}
	r.RecoverAfter = (time.Duration(st.RecoverAfterSeconds) * time.Second).String()
	r.BalanceEnabled = st.BalanceEnabled
	r.BlockedCopysets = []blockedView{}
	for _, b := range st.Blocked {
		r.BlockedCopysets = append(r.BlockedCopysets, blockedView{Copyset: b.Copyset.Name(), Reason: b.Reason})
	}
	for _, cs := range topo.chunkservers {
		if cs.RwState == mdspb.RWState_RW_STATE_RETIRING {
			r.RetiringChunkServers++
			problem("chunkserver %d (%s, zone %s) is retiring: %d replicas left to move", cs.Id, cs.Hostname, cs.Zone, cs.CopysetCount)
		}
		if cs.OnlineState == mdspb.OnlineState_ONLINE_STATE_OFFLINE || cs.RwState == mdspb.RWState_RW_STATE_RETIRED {
			continue
		}
		switch used := cs.GetCapacity().UsedFraction(); {
		case used >= st.SpaceFull:
			problem("chunkserver %d (%s, zone %s) is %.0f%% full: it takes no new replicas (full at %.0f%%)", cs.Id, cs.Hostname, cs.Zone, 100*used, 100*st.SpaceFull)
		case used >= st.SpaceWarn:
			problem("chunkserver %d (%s, zone %s) is %.0f%% full (warning at %.0f%%)", cs.Id, cs.Hostname, cs.Zone, 100*used, 100*st.SpaceWarn)
		}
	}
	return st.Blocked, nil
}

// line is the one-line summary in the status table.
func (r *recoveryView) line() string {
	if r.CopysetsToRepair == 0 && r.CopysetsMoving == 0 && len(r.Operators) == 0 {
		return "nothing to repair or move"
	}
	parts := []string{fmt.Sprintf("%d copysets to repair, %d moving", r.CopysetsToRepair, r.CopysetsMoving)}
	if r.Blocked > 0 {
		parts[0] += fmt.Sprintf(" (%d blocked)", r.Blocked)
	}
	if len(r.Operators) > 0 {
		var ops []string
		for reason, n := range r.Operators {
			ops = append(ops, fmt.Sprintf("%s %d", reason, n))
		}
		sort.Strings(ops)
		parts = append(parts, "operators: "+strings.Join(ops, ", "))
	}
	if r.BytesToMove > 0 {
		cp := formatBytes(r.BytesToMove) + " to copy"
		if r.ETASeconds >= 0 {
			cp += fmt.Sprintf(" at %s/s, about %s left", formatBytes(uint64(r.BytesPerSecond)), time.Duration(r.ETASeconds)*time.Second)
		}
		parts = append(parts, cp)
	}
	return strings.Join(parts, "; ")
}
