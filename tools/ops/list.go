package ops

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"cairn.io/cairn/api/mdspb"
)

func (a *app) listCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List zones, servers, chunkservers, pools, copysets, operators, volumes, snapshots, the trash, sessions or CSI nodes",
	}
	cmd.AddCommand(a.listSessionCommand(), a.listNodeCommand(),
		&cobra.Command{
			Use: "zone", Aliases: []string{"zones"}, Short: "List zones", Args: exactArgs(0, "none"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error { return a.listZones(ctx) }),
		},
		&cobra.Command{
			Use: "server", Aliases: []string{"servers"}, Short: "List servers (hosts)", Args: exactArgs(0, "none"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error { return a.listServers(ctx) }),
		},
		&cobra.Command{
			Use: "chunkserver", Aliases: []string{"chunkservers", "cs"}, Short: "List chunkservers with state, copysets and capacity",
			Args: exactArgs(0, "none"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error { return a.listChunkServers(ctx) }),
		},
		&cobra.Command{
			Use: "pool", Aliases: []string{"pools"}, Short: "List physical and logical pools", Args: exactArgs(0, "none"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error { return a.listPoolsCmd(ctx) }),
		},
		a.listCopysetCommand(),
		a.listOperatorCommand(),
		a.listSnapshotCommand(),
		a.listTrashCommand(),
		&cobra.Command{
			Use: "volume", Aliases: []string{"volumes"}, Short: "List volumes", Args: exactArgs(0, "none"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error { return a.listVolumes(ctx) }),
		},
	)
	return cmd
}

// ---------------------------------------------------------------- zones

type zoneList struct {
	Zones []zoneView `json:"zones"`
}

func (a *app) listZones(ctx context.Context) error {
	topo, err := a.fetchTopology(ctx)
	if err != nil {
		return err
	}
	physNames := map[uint32]string{}
	for _, p := range topo.physical {
		physNames[p.Id] = p.Name
	}
	servers, chunkservers := map[uint32]int{}, map[uint32]int{}
	for _, s := range topo.servers {
		servers[s.ZoneId]++
	}
	for _, cs := range topo.chunkservers {
		chunkservers[cs.ZoneId]++
	}
	out := zoneList{Zones: []zoneView{}}
	for _, z := range topo.zones {
		out.Zones = append(out.Zones, zoneView{
			ID: z.Id, Name: z.Name, PhysicalPoolID: z.PhysicalPoolId, PhysicalPool: physNames[z.PhysicalPoolId],
			Servers: servers[z.Id], ChunkServers: chunkservers[z.Id],
		})
	}
	return a.emit(&out)
}

func (l *zoneList) writeTable(t *table) {
	t.row("ID", "NAME", "PHYSICAL POOL", "SERVERS", "CHUNKSERVERS")
	for _, z := range l.Zones {
		t.row(z.ID, z.Name, z.PhysicalPool, z.Servers, z.ChunkServers)
	}
}

// -------------------------------------------------------------- servers

type serverList struct {
	Servers []serverView `json:"servers"`
}

func (a *app) listServers(ctx context.Context) error {
	topo, err := a.fetchTopology(ctx)
	if err != nil {
		return err
	}
	zoneNames := map[uint32]string{}
	for _, z := range topo.zones {
		zoneNames[z.Id] = z.Name
	}
	chunkservers := map[uint32]int{}
	for _, cs := range topo.chunkservers {
		chunkservers[cs.ServerId]++
	}
	out := serverList{Servers: []serverView{}}
	for _, s := range topo.servers {
		out.Servers = append(out.Servers, serverView{
			ID: s.Id, Hostname: s.Hostname, ZoneID: s.ZoneId, Zone: zoneNames[s.ZoneId], ChunkServers: chunkservers[s.Id],
		})
	}
	return a.emit(&out)
}

func (l *serverList) writeTable(t *table) {
	t.row("ID", "HOSTNAME", "ZONE", "CHUNKSERVERS")
	for _, s := range l.Servers {
		t.row(s.ID, s.Hostname, s.Zone, s.ChunkServers)
	}
}

// --------------------------------------------------------- chunkservers

type chunkServerList struct {
	ChunkServers []chunkServerView `json:"chunkservers"`
	chunkSize    uint64
}

func (a *app) listChunkServers(ctx context.Context) error {
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	resp, err := a.conn.Topology().ListChunkServers(cctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return rpcErr("list chunkservers", err)
	}
	cluster, err := a.conn.Cluster().GetClusterStatus(cctx, &mdspb.GetClusterStatusRequest{})
	if err != nil {
		return rpcErr("get cluster status", err)
	}
	out := chunkServerList{ChunkServers: []chunkServerView{}, chunkSize: cluster.GetConstants().GetChunkSize()}
	for _, cs := range resp.Chunkservers {
		out.ChunkServers = append(out.ChunkServers, newChunkServerView(cs))
	}
	return a.emit(&out)
}

func (l *chunkServerList) writeTable(t *table) {
	t.row("ID", "HOSTNAME", "ZONE", "ADDRESS", "STATE", "RW", "COPYSETS", "LEADERS", "DISK USED", "DISK TOTAL",
		"CHUNK FILES FREE", "GROWABLE", "FORMATTING")
	for _, c := range l.ChunkServers {
		t.row(c.ID, c.Hostname, c.Zone, c.Address, c.OnlineState, c.RWState, c.Copysets, c.Leaders,
			formatBytes(c.DiskTotalBytes-min(c.DiskFreeBytes, c.DiskTotalBytes)), formatBytes(c.DiskTotalBytes),
			fmt.Sprintf("%d (%s)", c.PoolFreeChunks, formatBytes(c.PoolFreeChunks*l.chunkSize)),
			fmt.Sprintf("%d (%s)", c.PoolGrowableChunks, formatBytes(c.PoolGrowableChunks*l.chunkSize)),
			formattingCell(c))
	}
}

// formattingCell says whether a chunkserver's pool is formatting and how
// far it has come.
func formattingCell(c chunkServerView) string {
	if c.FormatPercent >= 100 {
		return "done"
	}
	return fmt.Sprintf("%d%% of %d files", c.FormatPercent, c.PoolTargetChunks)
}

// ---------------------------------------------------------------- pools

type poolList struct {
	PhysicalPools []physicalPoolView `json:"physical_pools"`
	LogicalPools  []logicalPoolView  `json:"logical_pools"`
}

func (a *app) listPoolsCmd(ctx context.Context) error {
	topo, err := a.fetchTopology(ctx)
	if err != nil {
		return err
	}
	out := poolList{PhysicalPools: []physicalPoolView{}, LogicalPools: []logicalPoolView{}}
	zones, chunkservers := map[uint32]int{}, map[uint32]int{}
	zonePool := map[uint32]uint32{}
	for _, z := range topo.zones {
		zones[z.PhysicalPoolId]++
		zonePool[z.Id] = z.PhysicalPoolId
	}
	for _, cs := range topo.chunkservers {
		chunkservers[zonePool[cs.ZoneId]]++
	}
	physNames := map[uint32]string{}
	for _, p := range topo.physical {
		physNames[p.Id] = p.Name
		out.PhysicalPools = append(out.PhysicalPools, physicalPoolView{
			ID: p.Id, Name: p.Name, Zones: zones[p.Id], ChunkServers: chunkservers[p.Id],
		})
	}
	for _, lp := range topo.logical {
		out.LogicalPools = append(out.LogicalPools, newLogicalPoolView(lp, physNames))
	}
	return a.emit(&out)
}

func (l *poolList) writeTable(t *table) {
	t.line("physical pools:")
	t.row("ID", "NAME", "ZONES", "CHUNKSERVERS")
	for _, p := range l.PhysicalPools {
		t.row(p.ID, p.Name, p.Zones, p.ChunkServers)
	}
	t.line("")
	t.line("logical pools:")
	t.row("ID", "NAME", "PHYSICAL POOL", "STATUS", "REPLICAS", "COPYSETS", "PER CHUNKSERVER")
	for _, p := range l.LogicalPools {
		t.row(p.ID, p.Name, p.PhysicalPool, p.Status, p.Replicas, p.Copysets, p.CopysetsPerChunkserver)
	}
}

// ------------------------------------------------------------- copysets

type copysetList struct {
	Copysets []copysetView `json:"copysets"`
}

func (a *app) listCopysetCommand() *cobra.Command {
	var pool string
	var maxGap uint64
	var staleAfter time.Duration
	cmd := &cobra.Command{
		Use: "copyset", Aliases: []string{"copysets"}, Args: exactArgs(0, "none"),
		Short: "List copysets with members, leader and health (the MDS's view)",
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, _ []string) error {
			topo, err := a.fetchTopology(ctx)
			if err != nil {
				return err
			}
			var poolID uint32
			if pool != "" {
				lp, err := resolveLogicalPool(topo.logical, pool)
				if err != nil {
					return err
				}
				poolID = lp.Id
			}
			copysets, err := a.listCopysets(ctx, poolID)
			if err != nil {
				return err
			}
			replicas := map[uint32]uint32{}
			for _, lp := range topo.logical {
				replicas[lp.Id] = lp.Replicas
			}
			p := healthParams{maxLogGap: maxGap, staleAfter: staleAfter, now: time.Now()}
			out := copysetList{Copysets: []copysetView{}}
			for _, c := range copysets {
				out.Copysets = append(out.Copysets, newCopysetView(c, mdsCopysetHealth(c, replicas[c.Id.GetLogicalPoolId()], topo.csByID, p)))
			}
			return a.emit(&out)
		}),
	}
	cmd.Flags().StringVar(&pool, "pool", "", "only copysets of this logical pool (name or id)")
	cmd.Flags().Uint64Var(&maxGap, "max-log-gap", 1000, "log entries a follower may trail its leader by")
	cmd.Flags().DurationVar(&staleAfter, "stale-after", 30*time.Second, "age after which a copyset leader's last report counts as lost")
	return cmd
}

func (l *copysetList) writeTable(t *table) {
	t.row("COPYSET", "LEADER", "PEERS", "CONF EPOCH", "TERM", "APPLIED", "HEALTH")
	for _, c := range l.Copysets {
		peers := make([]string, len(c.Peers))
		for i, p := range c.Peers {
			peers[i] = fmt.Sprint(p.ChunkserverID)
		}
		health := "healthy"
		if !c.Healthy {
			health = strings.Join(c.Reasons, ",")
		}
		t.row(c.Copyset, idOrDash(c.LeaderID), strings.Join(peers, ","), c.ConfEpoch, c.Term, c.AppliedIndex, health)
	}
}

// -------------------------------------------------------------- volumes

type volumeList struct {
	Volumes []volumeView `json:"volumes"`
}

func (a *app) listVolumes(ctx context.Context) error {
	pools, err := a.listPools(ctx)
	if err != nil {
		return err
	}
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	resp, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
	if err != nil {
		return rpcErr("list volumes", err)
	}
	out := volumeList{Volumes: []volumeView{}}
	names := logicalPoolNames(pools.LogicalPools)
	for _, v := range resp.Volumes {
		out.Volumes = append(out.Volumes, newVolumeView(v, names))
	}
	return a.emit(&out)
}

func logicalPoolNames(pools []*mdspb.LogicalPool) map[uint32]string {
	names := map[uint32]string{}
	for _, p := range pools {
		names[p.Id] = p.Name
	}
	return names
}

func (l *volumeList) writeTable(t *table) {
	t.row("ID", "NAME", "SIZE", "ALLOCATED", "POOL", "EPOCH", "STATUS", "OWNER", "CREATED", "CLONE OF")
	for _, v := range l.Volumes {
		t.row(v.ID, v.Name, formatBytes(v.Size), fmt.Sprintf("%s (%d segments)", formatBytes(v.AllocatedBytes), v.AllocatedSegments),
			dash(v.LogicalPool), v.Epoch, v.Status, dash(v.Owner), formatUnix(v.CreatedUnix), dash(v.Source))
	}
}
