package ops

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/units"
)

func (a *app) createCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "create", Short: "Create a volume, a snapshot, a logical pool or a certificate"}
	cmd.AddCommand(a.createVolumeCommand(), a.createSnapshotCommand(), a.createPoolCommand(), a.createCertCommand())
	return cmd
}

func (a *app) extendCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "extend", Short: "Grow (or, with --allow-shrink, shrink) a volume"}
	var size string
	var allowShrink bool
	vol := &cobra.Command{
		Use:   "volume NAME --size SIZE [--allow-shrink]",
		Short: "Grow a volume to SIZE (rounded up to whole segments); shrink it only with --allow-shrink",
		Long: `extend volume grows a volume; its clients see the new size within a few
seconds. With --allow-shrink it also shrinks one: what lies beyond the new
size is lost, and its space is given back in the background (the volume
grows again once that is done). A shrink is refused while the volume is open
for writing, published to a node, has snapshots or is a clone not flattened.`,
		Args: exactArgs(1, "NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			n, err := units.ParseBytes(size)
			if err != nil {
				return usageError(fmt.Errorf("--size: %w", err))
			}
			before, err := a.statVolume(ctx, args[0])
			if err != nil {
				return err
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().ExtendVolume(cctx, &mdspb.ExtendVolumeRequest{Name: args[0], NewSize: n, AllowShrink: allowShrink})
			if err != nil {
				return rpcErr(fmt.Sprintf("extend volume %q", args[0]), err)
			}
			action := "extended"
			switch {
			case resp.Volume.Size == before.Volume.Size:
				action = "unchanged"
			case resp.Volume.Size < before.Volume.Size:
				action = "shrunk (the space beyond is given back in the background)"
			}
			return a.emitVolumeChange(ctx, action, resp.Volume, n)
		}),
	}
	vol.Flags().StringVar(&size, "size", "", "new size: bytes or a size such as 20GiB")
	vol.Flags().BoolVar(&allowShrink, "allow-shrink", false, "shrink the volume if SIZE is below its size (what lies beyond is lost)")
	_ = vol.MarkFlagRequired("size")
	cmd.AddCommand(vol)
	return cmd
}

func (a *app) deleteCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "delete", Short: "Delete a volume, a snapshot, a volume in the trash, a retired chunkserver or a stale session"}
	var yes, force bool
	var wait time.Duration
	vol := &cobra.Command{
		Use:   "volume NAME",
		Short: "Delete a volume (asks for its name as confirmation unless --yes)",
		Long: `delete volume removes a volume's name at once and frees its chunks in the
background. It asks for the volume's name as confirmation on standard input
unless --yes is given. A volume open for writing, or with snapshots, is
refused unless --force.`,
		Args: exactArgs(1, "NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			name := args[0]
			st, err := a.statVolume(ctx, name)
			if err != nil {
				return err
			}
			if !yes {
				if err := a.confirm(st.Volume, st.Sessions); err != nil {
					return err
				}
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			if _, err := a.conn.Volumes().DeleteVolume(cctx, &mdspb.DeleteVolumeRequest{Name: name, Force: force}); err != nil {
				return forceHint(rpcErr(fmt.Sprintf("delete volume %q", name), err), "delete volume "+name+" --force")
			}
			res := &deleteResult{Deleted: name, VolumeID: st.Volume.Id}
			if wait > 0 {
				if err := a.waitFreed(ctx, st.Volume, wait); err != nil {
					return err
				}
				res.Freed = true
			}
			return a.emit(res)
		}),
	}
	vol.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the volume's chunks to be freed")
	vol.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	vol.Flags().BoolVar(&force, "force", false, "delete even while a client has the volume open for writing, and its snapshots with it")
	cmd.AddCommand(vol, a.deleteSnapshotCommand(), a.deleteChunkServerCommand(), a.deleteSessionCommand(), a.deleteTrashCommand())
	return cmd
}

// confirm asks the operator to type the volume's name.
func (a *app) confirm(v *mdspb.Volume, sessions []*mdspb.Session) error {
	open := ""
	if len(sessions) > 0 {
		open = fmt.Sprintf(", open by %d client(s)", len(sessions))
	}
	fmt.Fprintf(a.stderr, "Delete volume %q (%s, %d segment(s) allocated%s)? Its data cannot be recovered.\nType the volume name to confirm: ",
		v.Name, formatBytes(v.Size), v.AllocatedSegments, open)
	line, err := bufio.NewReader(a.stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read confirmation: %w", err)
	}
	if strings.TrimSpace(line) != v.Name {
		fmt.Fprintln(a.stderr)
		return fmt.Errorf("delete volume %q: %w", v.Name, ErrNotConfirmed)
	}
	return nil
}

type deleteResult struct {
	Deleted  string `json:"deleted"`
	VolumeID uint64 `json:"volume_id"`
	// Freed is true once its chunks were freed (only with --wait).
	Freed bool `json:"freed"`
}

func (r *deleteResult) writeTable(t *table) {
	if r.Freed {
		t.line("volume %q (id %d) deleted and its chunks freed", r.Deleted, r.VolumeID)
		return
	}
	t.line("volume %q (id %d) deleted; its chunks are freed in the background", r.Deleted, r.VolumeID)
}

// waitFreed waits until the MDS has freed a deleted volume's chunks and
// removed its record, showing on a terminal how many of its segments are
// freed (the MDS frees them one by one).
func (a *app) waitFreed(ctx context.Context, v *mdspb.Volume, wait time.Duration) error {
	total := int64(v.AllocatedSegments)
	var freed int64
	poll := func(bool) (bool, progress, error) {
		cctx, cancel := a.callCtx(ctx)
		vols, err := a.conn.Volumes().ListVolumes(cctx, &mdspb.ListVolumesRequest{})
		cancel()
		if err != nil {
			return false, progress{}, rpcErr("list volumes", err)
		}
		for _, x := range vols.Volumes {
			if x.Id != v.Id {
				continue
			}
			if total == 0 {
				return false, progress{desc: fmt.Sprintf("removing the record of volume %s (no segment to free)", v.Name)}, nil
			}
			freed = total - min(int64(x.AllocatedSegments), total)
			return false, progress{done: freed, total: total, desc: fmt.Sprintf("freeing volume %s: segments", v.Name)}, nil
		}
		freed = total
		return true, progress{done: total, total: total}, nil
	}
	return a.waitUntil(ctx, wait, 200*time.Millisecond, poll, func() error {
		return fmt.Errorf("volume %q (id %d) is deleted, but its chunks are not all freed after %s (%d of %d segments freed); the MDS goes on freeing them",
			v.Name, v.Id, wait, freed, total)
	})
}

func (a *app) createVolumeCommand() *cobra.Command {
	var size, pool, owner, from string
	cmd := &cobra.Command{
		Use:   "volume NAME --size SIZE | --from VOLUME@SNAPSHOT [--size SIZE]",
		Short: "Create a volume (size rounded up to whole segments), or an instant clone of a snapshot",
		Long: `create volume NAME --size SIZE makes an empty volume. With --from VOLUME@SNAPSHOT
it makes a clone at once, copying nothing: the clone reads the snapshot where
it was not written, and its writes copy only the pages they cover in part.
The snapshot cannot be deleted until the clone is flattened (cairn-ops
flatten NAME) or deleted. A clone is at least its snapshot's size.`,
		Args: exactArgs(1, "NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			req := &mdspb.CreateVolumeRequest{Name: args[0], Owner: owner, Pool: pool}
			var n uint64
			if size != "" {
				var err error
				if n, err = units.ParseBytes(size); err != nil {
					return usageError(fmt.Errorf("--size: %w", err))
				}
				req.Size = n
			}
			switch {
			case from != "":
				var err error
				if req.SourceVolume, req.SourceSnapshot, err = cloneOf(from); err != nil {
					return err
				}
			case size == "":
				return usageError(fmt.Errorf("--size is required (or --from VOLUME@SNAPSHOT for a clone)"))
			}
			cctx, cancel := a.callCtx(ctx)
			defer cancel()
			resp, err := a.conn.Volumes().CreateVolume(cctx, req)
			if err != nil {
				return rpcErr(fmt.Sprintf("create volume %q", args[0]), err)
			}
			if n == 0 {
				n = resp.Volume.Size
			}
			if note := a.overcommitNote(ctx, resp.Volume); note != "" {
				fmt.Fprintf(a.stderr, "cairn-ops: warning: %s\n", note)
			}
			return a.emitVolumeChange(ctx, "created", resp.Volume, n)
		}),
	}
	cmd.Flags().StringVar(&size, "size", "", "size: bytes or a size such as 10GiB")
	cmd.Flags().StringVar(&pool, "pool", "", "logical pool name (default: the only or first pool)")
	cmd.Flags().StringVar(&owner, "owner", "", "owner recorded with the volume")
	cmd.Flags().StringVar(&from, "from", "", "make a clone of this snapshot (VOLUME@SNAPSHOT)")
	return cmd
}

type volumeChange struct {
	Action        string     `json:"action"`
	RequestedSize uint64     `json:"requested_size"`
	Volume        volumeView `json:"volume"`
}

func (a *app) emitVolumeChange(ctx context.Context, action string, v *mdspb.Volume, requested uint64) error {
	names := map[uint32]string{}
	if pools, err := a.listPools(ctx); err == nil {
		names = logicalPoolNames(pools.LogicalPools)
	}
	return a.emit(&volumeChange{Action: action, RequestedSize: requested, Volume: newVolumeView(v, names)})
}

func (r *volumeChange) writeTable(t *table) {
	v := r.Volume
	t.line("volume %q (id %d) %s: %s in pool %s", v.Name, v.ID, r.Action, formatBytes(v.Size), dash(v.LogicalPool))
	if v.Source != "" {
		t.line("a clone of %s: it reads the snapshot where it was not written (flatten it to make it independent)", v.Source)
	}
	if v.Size != r.RequestedSize {
		t.line("(%s requested, rounded up to whole segments of %s)", formatBytes(r.RequestedSize), formatBytes(v.SegmentSize))
	}
}

func (a *app) createPoolCommand() *cobra.Command {
	var physical string
	var perCS, replicas uint32
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "pool NAME --physical-pool P",
		Short: "Create a logical pool: place copysets over a physical pool's chunkservers",
		Long: `create pool places copysets over the chunkservers of a physical pool (at least
three zones) and asks every member chunkserver to create them. Creating a pool
that exists returns it. With --wait it waits until every chunkserver has
created its copysets (the pool is ready).`,
		Args: exactArgs(1, "NAME"),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			name := args[0]
			cctx, cancel := a.callCtx(ctx)
			resp, err := a.conn.Topology().CreateLogicalPool(cctx, &mdspb.CreateLogicalPoolRequest{
				Name: name, PhysicalPool: physical, Replicas: replicas, CopysetsPerChunkserver: perCS,
			})
			cancel()
			var lp *mdspb.LogicalPool
			switch {
			case err == nil:
				lp = resp.Pool
			case status.Code(err) == codes.Aborted && wait > 0:
				// Recorded; some chunkservers have not created their
				// copysets yet and the MDS keeps asking them.
			default:
				return rpcErr(fmt.Sprintf("create logical pool %q", name), err)
			}
			if wait > 0 && (lp == nil || lp.Status != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY) {
				if lp, err = a.waitPoolReady(ctx, name, wait); err != nil {
					return err
				}
			}
			pools, err := a.listPools(ctx)
			if err != nil {
				return err
			}
			phys := map[uint32]string{}
			for _, p := range pools.PhysicalPools {
				phys[p.Id] = p.Name
			}
			v := newLogicalPoolView(lp, phys)
			return a.emit(&v)
		}),
	}
	cmd.Flags().StringVar(&physical, "physical-pool", "", "physical pool whose chunkservers hold the copysets")
	cmd.Flags().Uint32Var(&perCS, "copysets-per-chunkserver", 0, "copyset replicas per chunkserver (default: the MDS's, 100)")
	cmd.Flags().Uint32Var(&replicas, "replicas", 3, "replicas per copyset (only 3 is supported)")
	cmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the pool to become ready")
	_ = cmd.MarkFlagRequired("physical-pool")
	return cmd
}

// waitPoolReady polls the pool until it is READY or wait passes, showing
// on a terminal how many of its copysets have a leader and how far the
// chunkservers' chunk file pools are formatted.
func (a *app) waitPoolReady(ctx context.Context, name string, wait time.Duration) (*mdspb.LogicalPool, error) {
	var lp *mdspb.LogicalPool
	poll := func(shown bool) (bool, progress, error) {
		pools, err := a.listPools(ctx)
		if err != nil {
			return false, progress{}, err
		}
		lp = nil
		for _, p := range pools.LogicalPools {
			if p.Name == name {
				lp = p
			}
		}
		if lp != nil && lp.Status == mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
			return true, progress{}, nil
		}
		if lp == nil || !shown {
			return false, progress{desc: fmt.Sprintf("waiting for the chunkservers to create the copysets of pool %s", name)}, nil
		}
		copysets, err := a.listCopysets(ctx, lp.Id)
		if err != nil {
			return false, progress{}, err
		}
		topo, err := a.fetchTopology(ctx)
		if err != nil {
			return false, progress{}, err
		}
		return false, poolProgress(lp, copysets, topo), nil
	}
	err := a.waitUntil(ctx, wait, 200*time.Millisecond, poll, func() error {
		if lp == nil {
			return notFound(fmt.Errorf("logical pool %q was not recorded", name))
		}
		return fmt.Errorf("logical pool %q is still being created after %s: not every chunkserver has created its copysets (the MDS keeps asking)", name, wait)
	})
	if err != nil {
		return nil, err
	}
	return lp, nil
}

// poolProgress is what is known of a pool being created: its copysets with
// a leader reported (the MDS does not count the copysets each chunkserver
// created; a copyset with a leader was created by a majority of its
// members), and the formatting of the chunk file pools of the chunkservers
// of its physical pool.
func poolProgress(lp *mdspb.LogicalPool, copysets []*mdspb.Copyset, topo *topology) progress {
	var led int64
	for _, c := range copysets {
		if c.LeaderId != 0 {
			led++
		}
	}
	inPool := map[uint32]bool{}
	for _, z := range topo.zones {
		inPool[z.Id] = z.PhysicalPoolId == lp.PhysicalPoolId
	}
	var formatted, target uint64
	for _, cs := range topo.chunkservers {
		if !inPool[cs.ZoneId] || cs.RwState == mdspb.RWState_RW_STATE_RETIRED {
			continue
		}
		c := cs.GetCapacity()
		f := c.GetPoolFreeChunks() + c.GetPoolUsedChunks()
		formatted += f
		target += max(c.GetPoolTargetChunks(), f)
	}
	return progress{
		done: led, total: int64(len(copysets)),
		desc: fmt.Sprintf("pool %s: copysets with a leader (chunk files formatted: %d of %d)", lp.Name, formatted, target),
	}
}

func (v *logicalPoolView) writeTable(t *table) {
	t.line("logical pool %q (id %d) over physical pool %q: %s, %d copysets, %d replicas, %d copysets per chunkserver",
		v.Name, v.ID, v.PhysicalPool, v.Status, v.Copysets, v.Replicas, v.CopysetsPerChunkserver)
}

func (a *app) updateCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "update", Short: "Change a copyset's leader, or drain chunkservers"}
	var copyset string
	var to uint64
	var wait time.Duration
	leader := &cobra.Command{
		Use:   "leader ID --to CHUNKSERVER",
		Short: "Move a copyset's leadership to one of its members",
		Long: `update leader queues a transfer-leader operator at the MDS; the copyset's
leader carries it out after its next heartbeat. ID is POOL:COPYSET (or COPYSET
when there is one logical pool), given as the argument, as check copyset takes
it (--copyset ID works too). With --wait it waits until the MDS sees the new
leader.`,
		Args: cobra.MaximumNArgs(1),
		RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
			copyset, err := copysetArg(args, copyset)
			if err != nil {
				return err
			}
			if copyset == "" {
				return usageError(errors.New("update leader needs the copyset: update leader POOL:COPYSET --to CHUNKSERVER"))
			}
			pools, err := a.listPools(ctx)
			if err != nil {
				return err
			}
			ref, err := parseCopysetID(copyset, pools.LogicalPools)
			if err != nil {
				return err
			}
			before, err := a.getCopysets(ctx, []*commonpb.CopysetRef{ref})
			if err != nil {
				return err
			}
			cctx, cancel := a.callCtx(ctx)
			resp, err := a.conn.Cluster().TransferLeader(cctx, &mdspb.TransferLeaderRequest{Copyset: ref, ToChunkserverId: to})
			cancel()
			if err != nil {
				return rpcErr(fmt.Sprintf("transfer leadership of copyset %s to chunkserver %d", ref.Name(), to), err)
			}
			out := &leaderChange{
				Copyset: ref.Name(), LogicalPoolID: ref.LogicalPoolId, CopysetID: ref.CopysetId,
				From: before[ref.Key()].GetLeaderId(), To: to, ConfEpoch: resp.Operator.GetConfEpoch(),
			}
			if wait > 0 {
				if err := a.waitLeader(ctx, ref, to, wait); err != nil {
					return err
				}
				out.Done = true
			}
			return a.emit(out)
		}),
	}
	leader.Flags().StringVar(&copyset, "copyset", "", "copyset id, instead of the argument: POOL:COPYSET, or COPYSET with a single logical pool")
	leader.Flags().Uint64Var(&to, "to", 0, "chunkserver id of the new leader (a member of the copyset)")
	leader.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the new leader to be reported")
	_ = leader.MarkFlagRequired("to")
	cmd.AddCommand(leader)
	cmd.AddCommand(a.stateCommands()...)
	return cmd
}

type leaderChange struct {
	Copyset       string `json:"copyset"`
	LogicalPoolID uint32 `json:"logical_pool_id"`
	CopysetID     uint32 `json:"copyset_id"`
	From          uint64 `json:"from"`
	To            uint64 `json:"to"`
	ConfEpoch     uint64 `json:"conf_epoch"`
	// Done is true once the MDS saw the new leader (only with --wait).
	Done bool `json:"done"`
}

func (r *leaderChange) writeTable(t *table) {
	if r.Done {
		t.line("copyset %s: leadership moved from chunkserver %s to chunkserver %d", r.Copyset, idOrDash(r.From), r.To)
		return
	}
	t.line("copyset %s: transfer of leadership from chunkserver %s to chunkserver %d queued (conf epoch %d); the leader carries it out after its next heartbeat",
		r.Copyset, idOrDash(r.From), r.To, r.ConfEpoch)
}

// waitLeader polls the MDS until it records to as the copyset's leader.
func (a *app) waitLeader(ctx context.Context, ref *commonpb.CopysetRef, to uint64, wait time.Duration) error {
	var leader uint64
	poll := func(bool) (bool, progress, error) {
		cs, err := a.getCopysets(ctx, []*commonpb.CopysetRef{ref})
		if err != nil {
			return false, progress{}, err
		}
		leader = cs[ref.Key()].GetLeaderId()
		return leader == to, progress{desc: fmt.Sprintf("waiting for chunkserver %d to lead copyset %s (leader now: %s)", to, ref.Name(), idOrDash(leader))}, nil
	}
	return a.waitUntil(ctx, wait, 100*time.Millisecond, poll, func() error {
		return fmt.Errorf("copyset %s: chunkserver %d is not the leader after %s (leader is %s); the operator stays queued until the leader carries it out or the configuration changes",
			ref.Name(), to, wait, idOrDash(leader))
	})
}
