package copyset

import (
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"cairn.io/cairn/api/commonpb"
)

// GroupID identifies a copyset inside a chunkserver: the logical pool id in
// the high 32 bits and the copyset id in the low 32 bits. It is also the
// copyset's Raft group id on the wire.
type GroupID uint64

// MakeGroupID packs a logical pool id and a copyset id.
func MakeGroupID(pool, copyset uint32) GroupID { return GroupID(commonpb.CopysetKey(pool, copyset)) }

// Pool is the logical pool id.
func (g GroupID) Pool() uint32 { return uint32(g >> 32) }

// Copyset is the copyset id within its pool.
func (g GroupID) Copyset() uint32 { return uint32(g) }

// String prints the id as POOL:COPYSET, as operators read it.
func (g GroupID) String() string { return commonpb.CopysetName(g.Pool(), g.Copyset()) }

// LogValue makes a log attribute of the id read POOL:COPYSET in every log
// format (slog.LogValuer): JSON would otherwise print the packed number.
func (g GroupID) LogValue() slog.Value { return slog.StringValue(g.String()) }

// DirName is the name of the copyset's directory: "pool-copyset".
func (g GroupID) DirName() string { return fmt.Sprintf("%d-%d", g.Pool(), g.Copyset()) }

// parseGroupID reads a directory name (DirName).
func parseGroupID(s string) (GroupID, bool) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, false
	}
	p, err1 := strconv.ParseUint(a, 10, 32)
	c, err2 := strconv.ParseUint(b, 10, 32)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return MakeGroupID(uint32(p), uint32(c)), true
}
