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
