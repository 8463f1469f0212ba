package ops

import (
	"sort"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
)

// The JSON views below are the tool's output contract: field names are
// snake_case and stable; docs/ops.md lists them.

type zoneView struct {
	ID             uint32 `json:"id"`
	Name           string `json:"name"`
	PhysicalPoolID uint32 `json:"physical_pool_id"`
	PhysicalPool   string `json:"physical_pool"`
	Servers        int    `json:"servers"`
	ChunkServers   int    `json:"chunkservers"`
}

type serverView struct {
	ID           uint32 `json:"id"`
	Hostname     string `json:"hostname"`
	ZoneID       uint32 `json:"zone_id"`
	Zone         string `json:"zone"`
	ChunkServers int    `json:"chunkservers"`
}

type chunkServerView struct {
	ID               uint64 `json:"id"`
	Hostname         string `json:"hostname"`
	ServerID         uint32 `json:"server_id"`
	ZoneID           uint32 `json:"zone_id"`
	Zone             string `json:"zone"`
	Address          string `json:"address"`
	DataDir          string `json:"data_dir"`
	OnlineState      string `json:"online_state"`
	RWState          string `json:"rw_state"`
	Copysets         uint32 `json:"copysets"`
	Leaders          uint32 `json:"leaders"`
	DiskTotalBytes   uint64 `json:"disk_total_bytes"`
	DiskFreeBytes    uint64 `json:"disk_free_bytes"`
	PoolFreeChunks   uint64 `json:"pool_free_chunks"`
	PoolUsedChunks   uint64 `json:"pool_used_chunks"`
	PoolTargetChunks uint64 `json:"pool_target_chunks"`
	// PoolGrowableChunks is how many more chunk files the pool may create
	// on demand; free plus growable is what new data can take.
	PoolGrowableChunks uint64 `json:"pool_growable_chunks"`
	FormatPercent      uint32 `json:"format_percent"`
	LastHeartbeatUnix  int64  `json:"last_heartbeat_unix"`
}

type physicalPoolView struct {
	ID           uint32 `json:"id"`
	Name         string `json:"name"`
	Zones        int    `json:"zones"`
	ChunkServers int    `json:"chunkservers"`
}

type logicalPoolView struct {
	ID                     uint32 `json:"id"`
	Name                   string `json:"name"`
	PhysicalPoolID         uint32 `json:"physical_pool_id"`
	PhysicalPool           string `json:"physical_pool"`
	Status                 string `json:"status"`
	Replicas               uint32 `json:"replicas"`
	Copysets               uint32 `json:"copysets"`
	CopysetsPerChunkserver uint32 `json:"copysets_per_chunkserver"`
}

type peerView struct {
	ChunkserverID uint64 `json:"chunkserver_id"`
	Address       string `json:"address"`
}

type copysetView struct {
	Copyset       string     `json:"copyset"`
	LogicalPoolID uint32     `json:"logical_pool_id"`
	CopysetID     uint32     `json:"copyset_id"`
	LeaderID      uint64     `json:"leader_id"`
	Peers         []peerView `json:"peers"`
	ConfEpoch     uint64     `json:"conf_epoch"`
	Term          uint64     `json:"term"`
	AppliedIndex  uint64     `json:"applied_index"`
	ReportedUnix  int64      `json:"reported_unix"`
	Healthy       bool       `json:"healthy"`
	Reasons       []string   `json:"reasons"`
	Problems      []string   `json:"problems"`
}

type volumeView struct {
	ID                uint64 `json:"id"`
	Name              string `json:"name"`
	Size              uint64 `json:"size"`
	Owner             string `json:"owner"`
	LogicalPoolID     uint32 `json:"logical_pool_id"`
	LogicalPool       string `json:"logical_pool"`
	ChunkSize         uint64 `json:"chunk_size"`
	SegmentSize       uint64 `json:"segment_size"`
	Epoch             uint64 `json:"epoch"`
	Status            string `json:"status"`
	CreatedUnix       int64  `json:"created_unix"`
	AllocatedSegments uint64 `json:"allocated_segments"`
	AllocatedBytes    uint64 `json:"allocated_bytes"`
	// Source is the snapshot a clone reads (VOLUME@SNAPSHOT; "" for a
	// volume that is not a clone, or once its source is released), and
	// Flattened whether it was flattened.
	Source    string `json:"source"`
	Flattened bool   `json:"flattened"`
}

type sessionView struct {
	Volume        string `json:"volume"`
	SessionID     string `json:"session_id"`
	Client        string `json:"client"`
	Node          string `json:"node"`
	ClientAddress string `json:"client_address"`
	Writable      bool   `json:"writable"`
	Epoch         uint64 `json:"epoch"`
	OpenedUnix    int64  `json:"opened_unix"`
	ExpiresUnix   int64  `json:"expires_unix"`
}

func onlineStateName(s mdspb.OnlineState) string {
	switch s {
	case mdspb.OnlineState_ONLINE_STATE_ONLINE:
		return "online"
	case mdspb.OnlineState_ONLINE_STATE_UNSTABLE:
		return "unstable"
	case mdspb.OnlineState_ONLINE_STATE_OFFLINE:
		return "offline"
	default:
		return "unknown"
	}
}

func poolStatusName(s mdspb.LogicalPoolStatus) string {
	switch s {
	case mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_CREATING:
		return "creating"
	case mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY:
		return "ready"
	default:
		return "unknown"
	}
}

func volumeStatusName(s mdspb.VolumeStatus) string {
	switch s {
	case mdspb.VolumeStatus_VOLUME_STATUS_CREATED:
		return "created"
	case mdspb.VolumeStatus_VOLUME_STATUS_DELETING:
		return "deleting"
	case mdspb.VolumeStatus_VOLUME_STATUS_TRASHED:
		return "trashed"
	default:
		return "unknown"
	}
}

func newChunkServerView(cs *mdspb.ChunkServer) chunkServerView {
	c := cs.GetCapacity()
	return chunkServerView{
		ID: cs.Id, Hostname: cs.Hostname, ServerID: cs.ServerId, ZoneID: cs.ZoneId, Zone: cs.Zone,
		Address: cs.Address, DataDir: cs.DataDir,
		OnlineState: onlineStateName(cs.OnlineState), RWState: cs.RwState.Label(),
		Copysets: cs.CopysetCount, Leaders: cs.LeaderCount,
		DiskTotalBytes: c.GetDiskTotalBytes(), DiskFreeBytes: c.GetDiskFreeBytes(),
		PoolFreeChunks: c.GetPoolFreeChunks(), PoolUsedChunks: c.GetPoolUsedChunks(),
		PoolTargetChunks: c.GetPoolTargetChunks(), FormatPercent: c.GetFormatPercent(), PoolGrowableChunks: c.GetPoolGrowableChunks(),
		LastHeartbeatUnix: cs.LastHeartbeatUnix,
	}
}

func newVolumeView(v *mdspb.Volume, poolNames map[uint32]string) volumeView {
	view := volumeView{
		ID: v.Id, Name: v.Name, Size: v.Size, Owner: v.Owner,
		LogicalPoolID: v.LogicalPoolId, LogicalPool: poolNames[v.LogicalPoolId],
		ChunkSize: v.ChunkSize, SegmentSize: v.SegmentSize, Epoch: v.Epoch,
		Status: volumeStatusName(v.Status), CreatedUnix: v.CreatedUnix,
		AllocatedSegments: v.AllocatedSegments, AllocatedBytes: v.AllocatedSegments * v.SegmentSize,
	}
	if cs := v.GetCloneSource(); cs != nil {
		view.Source, view.Flattened = cs.Volume+"@"+cs.Snapshot, cs.FlattenedUnix != 0
	}
	return view
}

func newSessionView(s *mdspb.Session) sessionView {
	return sessionView{
		Volume: s.Volume, SessionID: s.SessionId, Client: s.Client, Node: s.Node, ClientAddress: s.ClientAddress, Writable: s.Writable,
		Epoch: s.Epoch, OpenedUnix: s.OpenedUnix, ExpiresUnix: s.ExpiresUnix,
	}
}

func newPeerViews(peers []*commonpb.Peer) []peerView {
	out := make([]peerView, 0, len(peers))
	for _, p := range peers {
		out = append(out, peerView{ChunkserverID: p.ChunkserverId, Address: p.Address})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ChunkserverID < out[j].ChunkserverID })
	return out
}
