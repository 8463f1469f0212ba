package ops

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
)

// Sessions (who has a volume open), CSI nodes and renames.

type sessionList struct {
	Sessions []sessionView `json:"sessions"`
}

func (a *app) listSessionCommand() *cobra.Command {
	return &cobra.Command{
		Use: "session [VOLUME]", Aliases: []string{"sessions", "client", "clients"},
		Short: "List the open sessions (clients) of a volume, or of every volume",
		Args:  cobra.MaximumNArgs(1),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().ListSessions(cctx, &mdspb.ListSessionsRequest{Name: name})
			if err != nil {
				return rpcErr("list sessions", err)
			}
			out := &sessionList{Sessions: []sessionView{}}
			for _, s := range resp.Sessions {
				out.Sessions = append(out.Sessions, newSessionView(s))
			}
			sort.Slice(out.Sessions, func(i, j int) bool {
				a, b := out.Sessions[i], out.Sessions[j]
				if a.Volume != b.Volume {
					return a.Volume < b.Volume
				}
				return a.OpenedUnix < b.OpenedUnix
			})
			return a.emit(out)
		}),
	}
}

func (l *sessionList) writeTable(t *table) {
	t.row("VOLUME", "SESSION", "CLIENT", "NODE", "ADDRESS", "WRITABLE", "EPOCH", "OPENED", "EXPIRES")
	for _, s := range l.Sessions {
		t.row(s.Volume, s.SessionID, dash(s.Client), dash(s.Node), dash(s.ClientAddress), s.Writable, s.Epoch,
			formatUnix(s.OpenedUnix), formatUnix(s.ExpiresUnix))
	}
}

type sessionClosed struct {
	Closed string `json:"closed"`
	Volume string `json:"volume"`
}

func (r *sessionClosed) writeTable(t *table) {
	t.line("session %s of volume %s closed", r.Closed, r.Volume)
}

func (a *app) deleteSessionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "session VOLUME SESSION",
		Short: "Close a stale session (a client that is gone and did not close it)",
		Long: `delete session removes a session record, as the client's own close would:
a volume whose writer died can then be deleted without --force. It does not
fence anyone: a client that still runs loses its session at its next
refresh, and a writer is fenced only by a new writable open.`,
		Args: exactArgs(2, "VOLUME SESSION"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			vol, id := args[0], args[1]
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			ls, err := a.conn.Volumes().ListSessions(cctx, &mdspb.ListSessionsRequest{Name: vol})
			if err != nil {
				return rpcErr(fmt.Sprintf("list sessions of volume %q", vol), err)
			}
			found := false
			for _, s := range ls.Sessions {
				found = found || s.SessionId == id
			}
			if !found {
				return notFound(fmt.Errorf("volume %q has no open session %s (cairn-ops list session %s)", vol, id, vol))
			}
			if _, err := a.conn.Volumes().CloseVolume(cctx, &mdspb.CloseVolumeRequest{Name: vol, SessionId: id}); err != nil {
				return rpcErr(fmt.Sprintf("close session %s of volume %q", id, vol), err)
			}
			return a.emit(&sessionClosed{Closed: id, Volume: vol})
		}),
	}
}

// nodeView is a CSI node and the volumes published to it.
type nodeView struct {
	Name           string            `json:"name"`
	Topology       map[string]string `json:"topology"`
	RegisteredUnix int64             `json:"registered_unix"`
	Volumes        []string          `json:"volumes"`
}

type nodeList struct {
	Nodes []nodeView `json:"nodes"`
}

func (a *app) listNodeCommand() *cobra.Command {
	return &cobra.Command{
		Use: "node", Aliases: []string{"nodes"}, Short: "List the CSI nodes and the volumes published to each",
		Args: exactArgs(0, "none"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error {
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			nodes, err := a.conn.Volumes().ListNodes(cctx, &mdspb.ListNodesRequest{})
			if err != nil {
				return rpcErr("list nodes", err)
			}
			vols, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
			if err != nil {
				return rpcErr("list volumes", err)
			}
			published := map[string][]string{}
			for _, v := range vols.Volumes {
				for _, p := range v.Publications {
					access := "rw"
					if p.ReadOnly {
						access = "ro"
					}
					published[p.Node] = append(published[p.Node], v.Name+" ("+access+")")
				}
			}
			out := &nodeList{Nodes: []nodeView{}}
			for _, n := range nodes.Nodes {
				vs := published[n.Name]
				sort.Strings(vs)
				out.Nodes = append(out.Nodes, nodeView{Name: n.Name, Topology: n.Topology, RegisteredUnix: n.RegisteredUnix, Volumes: append([]string{}, vs...)})
			}
			sort.Slice(out.Nodes, func(i, j int) bool { return out.Nodes[i].Name < out.Nodes[j].Name })
			return a.emit(out)
		}),
	}
}

func (l *nodeList) writeTable(t *table) {
	t.row("NODE", "TOPOLOGY", "REGISTERED", "VOLUMES")
	for _, n := range l.Nodes {
		var topo []string
		for k, v := range n.Topology {
			topo = append(topo, k+"="+v)
		}
		sort.Strings(topo)
		t.row(n.Name, dash(strings.Join(topo, ",")), formatUnix(n.RegisteredUnix), dash(strings.Join(n.Volumes, ", ")))
	}
}

type renameResult struct {
	Renamed string     `json:"renamed"`
	Volume  volumeView `json:"volume"`
}

func (r *renameResult) writeTable(t *table) {
	t.line("volume %s renamed to %s", r.Renamed, r.Volume.Name)
}

func (a *app) renameCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "rename", Short: "Rename a volume"}
	cmd.AddCommand(&cobra.Command{
		Use: "volume NAME NEW_NAME", Short: "Rename a volume (its clients keep their sessions and data)",
		Args: exactArgs(2, "NAME NEW_NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().RenameVolume(cctx, &mdspb.RenameVolumeRequest{Name: args[0], NewName: args[1]})
			if err != nil {
				return rpcErr(fmt.Sprintf("rename volume %q", args[0]), err)
			}
			pools, err := a.listPools(ctx)
			if err != nil {
				return err
			}
			return a.emit(&renameResult{Renamed: args[0], Volume: newVolumeView(resp.Volume, logicalPoolNames(pools.LogicalPools))})
		}),
	})
	return cmd
}
