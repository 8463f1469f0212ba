package ops

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
)

// Draining, retiring and deleting chunkservers, and the operators the
// schedulers run.

// stateCommands are `update chunkserver|server|zone ID --state STATE`.
func (a *app) stateCommands() []*cobra.Command {
	var out []*cobra.Command
	for _, what := range []string{"chunkserver", "server", "zone"} {
		var state string
		cmd := &cobra.Command{
			Use:   what + " ID --state retiring|readwrite",
			Short: fmt.Sprintf("Drain a %s (--state retiring) or cancel a drain (--state readwrite)", what),
			Long: fmt.Sprintf(`update %s --state retiring moves every replica off the %s's chunkservers
(add a replica elsewhere, then remove this one; never below a quorum). Each
chunkserver reads "retired" once it holds nothing and can then be removed
with: cairn-ops delete chunkserver ID. --state readwrite cancels a drain (moves
under way finish) or brings a retired chunkserver back into use.`, what, what),
			Args: exactArgs(1, "ID"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
				st, err := parseRWState(state)
				if err != nil {
					return usageError(err)
				}
				req := &mdspb.UpdateChunkServerRequest{RwState: st}
				if err := a.selectChunkServers(ctx, what, args[0], req); err != nil {
					return err
				}
				cctx, cancel := a.callCtx(ctx)
				defer cancel()
				resp, err := a.conn.Topology().UpdateChunkServer(cctx, req)
				if err != nil {
					return rpcErr(fmt.Sprintf("update %s %s", what, args[0]), err)
				}
				out := &stateChange{State: st.Label(), ChunkServers: []chunkServerView{}}
				for _, cs := range resp.Chunkservers {
					out.ChunkServers = append(out.ChunkServers, newChunkServerView(cs))
				}
				return a.emit(out)
			}),
		}
		cmd.Flags().StringVar(&state, "state", "", "retiring (drain) or readwrite (cancel a drain)")
		_ = cmd.MarkFlagRequired("state")
		out = append(out, cmd)
	}
	return out
}

func parseRWState(s string) (mdspb.RWState, error) {
	switch strings.ToLower(s) {
	case "retiring":
		return mdspb.RWState_RW_STATE_RETIRING, nil
	case "readwrite":
		return mdspb.RWState_RW_STATE_READWRITE, nil
	case "retired":
		return 0, fmt.Errorf("--state retired cannot be set: set retiring; a chunkserver reads retired once drained")
	}
	return 0, fmt.Errorf("--state %q: want retiring or readwrite", s)
}

// selectChunkServers fills in the selector: a chunkserver by id, a server
// by id or host name, a zone by id or name.
func (a *app) selectChunkServers(ctx context.Context, what, arg string, req *mdspb.UpdateChunkServerRequest) error {
	id, numErr := strconv.ParseUint(arg, 10, 32)
	switch {
	case what == "chunkserver":
		n, err := strconv.ParseUint(arg, 10, 64)
		if err != nil || n == 0 {
			return usageError(fmt.Errorf("chunkserver id %q: want a positive number (see: cairn-ops list chunkserver)", arg))
		}
		req.ChunkserverId = n
		return nil
	case numErr == nil && id > 0:
		if what == "server" {
			req.ServerId = uint32(id)
		} else {
			req.ZoneId = uint32(id)
		}
		return nil
	}
	topo, err := a.fetchTopology(ctx)
	if err != nil {
		return err
	}
	if what == "server" {
		for _, s := range topo.servers {
			if s.Hostname == arg {
				req.ServerId = s.Id
				return nil
			}
		}
		return &exitError{code: ExitNotFound, err: fmt.Errorf("no server has host name %q (see: cairn-ops list server)", arg)}
	}
	var ids []uint32
	for _, z := range topo.zones {
		if z.Name == arg {
			ids = append(ids, z.Id)
		}
	}
	switch len(ids) {
	case 0:
		return &exitError{code: ExitNotFound, err: fmt.Errorf("no zone is named %q (see: cairn-ops list zone)", arg)}
	case 1:
		req.ZoneId = ids[0]
		return nil
	}
	return usageError(fmt.Errorf("zone name %q is used in several physical pools (ids %v): give the id", arg, ids))
}

type stateChange struct {
	State        string            `json:"state"`
	ChunkServers []chunkServerView `json:"chunkservers"`
}

func (r *stateChange) writeTable(t *table) {
	for _, cs := range r.ChunkServers {
		switch {
		case r.State == "retiring" && cs.RWState == "retired":
			t.line("chunkserver %d (%s, zone %s) is retired already: it holds nothing", cs.ID, cs.Hostname, cs.Zone)
		case r.State == "retiring":
			t.line("chunkserver %d (%s, zone %s) is retiring: its %d replicas move to other chunkservers (watch: cairn-ops status)",
				cs.ID, cs.Hostname, cs.Zone, cs.Copysets)
		default:
			t.line("chunkserver %d (%s, zone %s) is readwrite", cs.ID, cs.Hostname, cs.Zone)
		}
	}
}

// deleteChunkServerCommand is `delete chunkserver ID`.
func (a *app) deleteChunkServerCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "chunkserver ID",
		Short: "Remove a retired or offline chunkserver that holds no replica from the topology",
		Args:  exactArgs(1, "ID"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			id, err := strconv.ParseUint(args[0], 10, 64)
			if err != nil || id == 0 {
				return usageError(fmt.Errorf("chunkserver id %q: want a positive number (see: cairn-ops list chunkserver)", args[0]))
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			if _, err := a.conn.Topology().DeleteChunkServer(cctx, &mdspb.DeleteChunkServerRequest{ChunkserverId: id}); err != nil {
				return rpcErr(fmt.Sprintf("delete chunkserver %d", id), err)
			}
			return a.emit(&chunkServerDeleted{Deleted: id})
		}),
	}
}

type chunkServerDeleted struct {
	Deleted uint64 `json:"deleted"`
}

func (r *chunkServerDeleted) writeTable(t *table) {
	t.line("chunkserver %d removed from the topology", r.Deleted)
}

// listOperatorCommand is `list operator`.
func (a *app) listOperatorCommand() *cobra.Command {
	return &cobra.Command{
		Use: "operator", Aliases: []string{"operators", "op"}, Short: "List the operators queued or running (moves, transfers, rebuilds)",
		Args: exactArgs(0, "none"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error {
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Cluster().ListOperators(cctx, &mdspb.ListOperatorsRequest{})
			if err != nil {
				return rpcErr("list operators", err)
			}
			now := time.Now()
			out := &operatorList{Operators: []operatorView{}}
			for _, op := range resp.Operators {
				v := operatorView{
					Copyset: op.Copyset.Name(), Kind: op.Kind.Label(), Target: op.Target.GetChunkserverId(),
					Reason: op.Reason, ConfEpoch: op.ConfEpoch,
				}
				if op.CreatedUnix > 0 {
					v.AgeSeconds = max(0, now.Unix()-op.CreatedUnix)
				}
				out.Operators = append(out.Operators, v)
			}
			return a.emit(out)
		}),
	}
}

type operatorList struct {
	Operators []operatorView `json:"operators"`
}

type operatorView struct {
	Copyset    string `json:"copyset"`
	Kind       string `json:"kind"`
	Target     uint64 `json:"target"`
	Reason     string `json:"reason"`
	ConfEpoch  uint64 `json:"conf_epoch"`
	AgeSeconds int64  `json:"age_seconds"`
}

func (l *operatorList) writeTable(t *table) {
	if len(l.Operators) == 0 {
		t.line("no operators")
		return
	}
	t.row("COPYSET", "KIND", "TARGET", "REASON", "AGE", "CONF EPOCH")
	for _, o := range l.Operators {
		t.row(o.Copyset, o.Kind, o.Target, o.Reason, (time.Duration(o.AgeSeconds) * time.Second).String(), o.ConfEpoch)
	}
}
