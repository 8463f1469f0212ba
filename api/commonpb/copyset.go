package commonpb

import "fmt"

// CopysetKey packs a copyset's identity into one number: the logical pool
// id in the high 32 bits, the copyset id in the low 32. It is the copyset's
// Raft group id on the wire and the key every component indexes copysets by.
func CopysetKey(pool, copyset uint32) uint64 { return uint64(pool)<<32 | uint64(copyset) }

// Key is r's CopysetKey.
func (r *CopysetRef) Key() uint64 { return CopysetKey(r.GetLogicalPoolId(), r.GetCopysetId()) }

// Name prints r as POOL:COPYSET, the form operators read and type.
func (r *CopysetRef) Name() string { return CopysetName(r.GetLogicalPoolId(), r.GetCopysetId()) }

// CopysetName prints a copyset's identity as POOL:COPYSET.
func CopysetName(pool, copyset uint32) string { return fmt.Sprintf("%d:%d", pool, copyset) }
