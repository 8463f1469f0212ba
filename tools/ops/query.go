package ops

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/units"
)

func (a *app) queryCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "query",
		Short: "Show one volume or where one chunk of a volume lives",
	}
	cmd.AddCommand(
		&cobra.Command{
			Use: "volume NAME", Short: "Show a volume: size, epoch, segments allocated, open sessions",
			Args: exactArgs(1, "NAME"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error { return a.queryVolume(ctx, args[0]) }),
		},
		&cobra.Command{
			Use:   "chunk VOLUME OFFSET",
			Short: "Show the chunk holding a byte offset of a volume: chunk id, copyset, replicas, leader",
			Long: `query chunk maps a byte offset of a volume (bytes or a size such as 3GiB) to its
chunk, the chunk's copyset, the copyset's replicas and its leader. An offset
whose segment was never written has no chunk yet (exit code 6).`,
			Args: exactArgs(2, "VOLUME OFFSET"),
			RunE: a.runE(func(ctx context.Context, _ *cobra.Command, args []string) error {
				off, err := units.ParseBytes(args[1])
				if err != nil {
					return usageError(fmt.Errorf("offset: %w", err))
				}
				return a.queryChunk(ctx, args[0], off)
			}),
		},
	)
	return cmd
}

// statVolume reads a volume and its live sessions.
func (a *app) statVolume(ctx context.Context, name string) (*mdspb.StatVolumeResponse, error) {
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	resp, err := a.conn.Volumes().StatVolume(cctx, &mdspb.StatVolumeRequest{Name: name})
	if err != nil {
		return nil, rpcErr(fmt.Sprintf("volume %q", name), err)
	}
	return resp, nil
}

type volumeDetail struct {
	Volume       volumeView        `json:"volume"`
	Publications []publicationView `json:"publications"`
	Sessions     []sessionView     `json:"sessions"`
	Snapshots    []snapshotView    `json:"snapshots"`
}

// publicationView is a volume's publication to a CSI node.
type publicationView struct {
	Node          string `json:"node"`
	ReadOnly      bool   `json:"read_only"`
	PublishedUnix int64  `json:"published_unix"`
}

func (a *app) queryVolume(ctx context.Context, name string) error {
	pools, err := a.listPools(ctx)
	if err != nil {
		return err
	}
	resp, err := a.statVolume(ctx, name)
	if err != nil {
		return err
	}
	out := volumeDetail{Volume: newVolumeView(resp.Volume, logicalPoolNames(pools.LogicalPools)), Sessions: []sessionView{},
		Publications: []publicationView{}}
	for _, p := range resp.Volume.Publications {
		out.Publications = append(out.Publications, publicationView{Node: p.Node, ReadOnly: p.ReadOnly, PublishedUnix: p.PublishedUnix})
	}
	for _, s := range resp.Sessions {
		out.Sessions = append(out.Sessions, newSessionView(s))
	}
	out.Snapshots = []snapshotView{}
	for _, s := range resp.Volume.Snapshots {
		out.Snapshots = append(out.Snapshots, newSnapshotView(name, s))
	}
	return a.emit(&out)
}

func (d *volumeDetail) writeTable(t *table) {
	v := d.Volume
	segments := uint64(0)
	if v.SegmentSize > 0 {
		segments = v.Size / v.SegmentSize
	}
	t.row("name:", v.Name)
	t.row("id:", v.ID)
	t.row("size:", fmt.Sprintf("%s (%d bytes)", formatBytes(v.Size), v.Size))
	t.row("status:", v.Status)
	t.row("pool:", fmt.Sprintf("%s (id %d)", dash(v.LogicalPool), v.LogicalPoolID))
	t.row("owner:", dash(v.Owner))
	t.row("epoch:", v.Epoch)
	t.row("segments:", fmt.Sprintf("%d of %d allocated (%s of %s), segment %s, chunk %s",
		v.AllocatedSegments, segments, formatBytes(v.AllocatedBytes), formatBytes(v.Size),
		formatBytes(v.SegmentSize), formatBytes(v.ChunkSize)))
	t.row("created:", formatUnix(v.CreatedUnix))
	if v.Source != "" {
		state := "not flattened"
		if v.Flattened {
			state = "flattened; released soon"
		}
		t.row("clone of:", fmt.Sprintf("%s (%s)", v.Source, state))
	}
	if len(d.Publications) == 0 {
		t.row("published:", "-")
	}
	for i, p := range d.Publications {
		label := ""
		if i == 0 {
			label = "published:"
		}
		access := "for writing"
		if p.ReadOnly {
			access = "read-only"
		}
		t.row(label, fmt.Sprintf("to node %s, %s, since %s", p.Node, access, formatUnix(p.PublishedUnix)))
	}
	snaps := "-"
	if n := len(d.Snapshots); n > 0 {
		names := make([]string, 0, n)
		for _, s := range d.Snapshots {
			label := s.Name
			if s.Status != "ready" {
				label += " (" + s.Status + ")"
			}
			names = append(names, label)
		}
		snaps = fmt.Sprintf("%d: %s", n, strings.Join(names, ", "))
	}
	t.row("snapshots:", snaps)
	t.row("sessions:", len(d.Sessions))
	if len(d.Sessions) == 0 {
		return
	}
	t.line("")
	t.row("SESSION", "CLIENT", "NODE", "ADDRESS", "WRITABLE", "EPOCH", "OPENED", "EXPIRES")
	for _, s := range d.Sessions {
		t.row(s.SessionID, dash(s.Client), dash(s.Node), dash(s.ClientAddress), s.Writable, s.Epoch, formatUnix(s.OpenedUnix), formatUnix(s.ExpiresUnix))
	}
}

type replicaView struct {
	ChunkserverID uint64 `json:"chunkserver_id"`
	Address       string `json:"address"`
	Leader        bool   `json:"leader"`
	OnlineState   string `json:"online_state"`
}

type chunkLocation struct {
	Volume        string        `json:"volume"`
	VolumeID      uint64        `json:"volume_id"`
	Offset        uint64        `json:"offset"`
	SegmentOffset uint64        `json:"segment_offset"`
	ChunkIndex    uint64        `json:"chunk_index"`
	ChunkOffset   uint64        `json:"chunk_offset"`
	ChunkID       uint64        `json:"chunk_id"`
	ChunkSize     uint64        `json:"chunk_size"`
	Copyset       string        `json:"copyset"`
	LogicalPoolID uint32        `json:"logical_pool_id"`
	CopysetID     uint32        `json:"copyset_id"`
	LeaderID      uint64        `json:"leader_id"`
	Replicas      []replicaView `json:"replicas"`
}

func (a *app) queryChunk(ctx context.Context, name string, off uint64) error {
	st, err := a.statVolume(ctx, name)
	if err != nil {
		return err
	}
	v := st.Volume
	if off >= v.Size {
		return usageError(fmt.Errorf("offset %d is beyond the end of volume %q (%d bytes)", off, name, v.Size))
	}
	cctx, cancel := a.callCtx(ctx)
	defer cancel()
	seg, err := a.conn.Volumes().GetSegment(cctx, &mdspb.GetSegmentRequest{Name: name, Offset: off})
	if status.Code(err) == codes.NotFound {
		segOff := off - off%v.SegmentSize
		return notFound(fmt.Errorf("offset %d of volume %q is %w: its segment at %d was never written, so it reads as zeros",
			off, name, ErrNotAllocated, segOff))
	}
	if err != nil {
		return rpcErr(fmt.Sprintf("segment at offset %d of volume %q", off, name), err)
	}
	s := seg.Segment
	idx := (off - s.Offset) / v.ChunkSize
	if idx >= uint64(len(s.Chunks)) {
		return fmt.Errorf("segment at %d of volume %q has %d chunks; offset %d needs chunk %d", s.Offset, name, len(s.Chunks), off, idx)
	}
	ch := s.Chunks[idx]
	copysets, err := a.getCopysets(ctx, []*commonpb.CopysetRef{ch.Copyset})
	if err != nil {
		return err
	}
	c := copysets[ch.Copyset.Key()]
	if c == nil {
		return fmt.Errorf("the MDS returned no record of copyset %s", ch.Copyset.Name())
	}
	cctx2, cancel2 := a.callCtx(ctx)
	defer cancel2()
	css, err := a.conn.Topology().ListChunkServers(cctx2, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return rpcErr("list chunkservers", err)
	}
	states := map[uint64]string{}
	for _, cs := range css.Chunkservers {
		states[cs.Id] = onlineStateName(cs.OnlineState)
	}
	out := chunkLocation{
		Volume: v.Name, VolumeID: v.Id, Offset: off, SegmentOffset: s.Offset, ChunkIndex: idx,
		ChunkOffset: off - s.Offset - idx*v.ChunkSize, ChunkID: ch.ChunkId, ChunkSize: v.ChunkSize,
		Copyset: ch.Copyset.Name(), LogicalPoolID: ch.Copyset.GetLogicalPoolId(), CopysetID: ch.Copyset.GetCopysetId(),
		LeaderID: c.LeaderId, Replicas: []replicaView{},
	}
	for _, p := range c.Peers {
		state := states[p.ChunkserverId]
		if state == "" {
			state = "unregistered"
		}
		out.Replicas = append(out.Replicas, replicaView{
			ChunkserverID: p.ChunkserverId, Address: p.Address, Leader: p.ChunkserverId == c.LeaderId, OnlineState: state,
		})
	}
	sort.Slice(out.Replicas, func(i, j int) bool { return out.Replicas[i].ChunkserverID < out.Replicas[j].ChunkserverID })
	return a.emit(&out)
}

func (l *chunkLocation) writeTable(t *table) {
	t.row("volume:", fmt.Sprintf("%s (id %d)", l.Volume, l.VolumeID))
	t.row("offset:", fmt.Sprintf("%d: chunk %d of the segment at %d, %d bytes into the chunk", l.Offset, l.ChunkIndex, l.SegmentOffset, l.ChunkOffset))
	t.row("chunk id:", l.ChunkID)
	t.row("copyset:", l.Copyset)
	t.row("leader:", idOrDash(l.LeaderID))
	t.line("")
	t.row("REPLICA", "ADDRESS", "ROLE", "STATE")
	for _, r := range l.Replicas {
		role := "follower"
		if r.Leader {
			role = "leader"
		}
		t.row(r.ChunkserverID, dash(r.Address), role, r.OnlineState)
	}
}
