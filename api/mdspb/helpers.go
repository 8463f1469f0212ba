package mdspb

// Label is the operator kind's short name in logs, metrics and the CLI:
// "transfer-leader", "add-peer", "remove-peer" or "unknown".
func (k OperatorKind) Label() string {
	switch k {
	case OperatorKind_OPERATOR_KIND_TRANSFER_LEADER:
		return "transfer-leader"
	case OperatorKind_OPERATOR_KIND_ADD_PEER:
		return "add-peer"
	case OperatorKind_OPERATOR_KIND_REMOVE_PEER:
		return "remove-peer"
	}
	return "unknown"
}

// Label is the read-write state's short name in logs and the CLI:
// "readwrite", "retiring", "retired" or "unknown".
func (s RWState) Label() string {
	switch s {
	case RWState_RW_STATE_READWRITE:
		return "readwrite"
	case RWState_RW_STATE_RETIRING:
		return "retiring"
	case RWState_RW_STATE_RETIRED:
		return "retired"
	}
	return "unknown"
}

// Label is the snapshot status's short name in logs and the CLI: "ready",
// "creating", "deleting" or "unknown".
func (s SnapshotStatus) Label() string {
	switch s {
	case SnapshotStatus_SNAPSHOT_STATUS_READY:
		return "ready"
	case SnapshotStatus_SNAPSHOT_STATUS_DELETING:
		return "deleting"
	case SnapshotStatus_SNAPSHOT_STATUS_CREATING:
		return "creating"
	}
	return "unknown"
}

// LiveSnapshot returns the volume's readable snapshot named name, or nil.
func (v *Volume) LiveSnapshot(name string) *Snapshot {
	for _, s := range v.GetSnapshots() {
		if s.GetName() == name && s.GetStatus() == SnapshotStatus_SNAPSHOT_STATUS_READY {
			return s
		}
	}
	return nil
}

// Kept reports a snapshot whose data chunks keep: a readable one or one
// being created.
func (s *Snapshot) Kept() bool {
	return s.GetStatus() == SnapshotStatus_SNAPSHOT_STATUS_READY || s.GetStatus() == SnapshotStatus_SNAPSHOT_STATUS_CREATING
}

// NewestLiveSnapshot returns the sequence number of the volume's newest
// snapshot that chunks keep data for (0: none): what its writes carry as
// keep.
func (v *Volume) NewestLiveSnapshot() uint64 {
	var n uint64
	for _, s := range v.GetSnapshots() {
		if s.Kept() {
			n = max(n, s.GetSeq())
		}
	}
	return n
}

// WriteSeq is the sequence number the volume's writes carry.
func (v *Volume) WriteSeq() uint64 { return max(v.GetSeq(), 1) }

// AvailableChunks is how many chunk files new data can still take on a
// chunkserver: the free formatted ones and those its pool may still create.
func (c *Capacity) AvailableChunks() uint64 {
	return c.GetPoolFreeChunks() + c.GetPoolGrowableChunks()
}

// UsedFraction is the fraction of a chunkserver's space in use, as the
// schedulers and status judge it: of its chunk file pool (counting what the
// pool may still grow into as free) or of its disk, whichever is fuller; 0
// when nothing is reported.
func (c *Capacity) UsedFraction() float64 {
	var used float64
	if total := c.GetPoolUsedChunks() + c.AvailableChunks(); total > 0 {
		used = float64(c.GetPoolUsedChunks()) / float64(total)
	}
	if c.GetDiskTotalBytes() > 0 {
		used = max(used, 1-float64(c.GetDiskFreeBytes())/float64(c.GetDiskTotalBytes()))
	}
	return used
}
