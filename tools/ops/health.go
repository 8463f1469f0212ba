package ops

import (
	"fmt"
	"slices"
	"time"

	"cairn.io/cairn/api/copysetpb"
	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/copysethealth"
)

// Reasons a copyset is not healthy. They are stable identifiers in JSON
// output (docs/ops.md); the first five are the MDS's too (copysethealth).
const (
	reasonNoLeader           = copysethealth.NoLeader
	reasonPeersOffline       = copysethealth.PeersOffline
	reasonUnderReplicated    = copysethealth.UnderReplicated
	reasonLogGap             = copysethealth.LogGap
	reasonInstallingSnapshot = copysethealth.InstallingSnapshot
	// A member chunkserver did not answer (check copyset only).
	reasonReplicaUnreachable = "replica_unreachable"
	// A member chunkserver does not host the copyset (check copyset only).
	reasonReplicaMissing = "replica_missing"
	// Replicas disagree on the configuration (conf epoch or members), or a
	// replica's members differ from the MDS's record (check copyset only).
	reasonConfMismatch = "conf_mismatch"
)

// health collects the reasons and the sentences that explain them.
type health struct {
	reasons  []string
	problems []string
	// findings are the problems with what each is about, for status to
	// group them by cause.
	findings []finding
}

// finding is one thing wrong with a copyset: its reason, its sentence, and
// the chunkserver it is about, so that what one chunkserver does to many
// copysets reads as one cause.
type finding struct {
	reason string
	text   string
	// cs is the chunkserver the finding is about; 0 when it is about the
	// copyset itself (no leader has reported, too few members).
	cs uint64
	// silence is how long the leader has not heard from cs, and behind how
	// many entries cs trails the leader: figures that differ from copyset
	// to copyset for one cause, of which a cause shows the largest.
	silence time.Duration
	behind  uint64
}

// add records a finding about the copyset itself.
func (h *health) add(reason, format string, args ...any) {
	h.note(finding{reason: reason}, format, args...)
}

// note records f with its sentence.
func (h *health) note(f finding, format string, args ...any) {
	if !slices.Contains(h.reasons, f.reason) {
		h.reasons = append(h.reasons, f.reason)
	}
	f.text = fmt.Sprintf(format, args...)
	h.problems = append(h.problems, f.text)
	h.findings = append(h.findings, f)
}

func (h *health) ok() bool { return len(h.reasons) == 0 }

// healthParams are the thresholds of the copyset checks.
type healthParams struct {
	// maxLogGap is how many entries a member may trail the leader by.
	maxLogGap uint64
	// staleAfter is how old a leader's last report may be.
	staleAfter time.Duration
	now        time.Time
}

// silent reports whether a copyset's leader has not heard from a voting
// member for too long (copysethealth.Silent).
func silent(pr *copysetpb.PeerProgress) bool { return copysethealth.Silent(pr) }

// csName names a chunkserver in problem sentences.
func csName(id uint64, byID map[uint64]*mdspb.ChunkServer) string {
	if cs := byID[id]; cs != nil && cs.Address != "" {
		return fmt.Sprintf("chunkserver %d (%s)", id, cs.Address)
	}
	return fmt.Sprintf("chunkserver %d", id)
}

// mdsCopysetHealth classifies a copyset from the MDS's record of it, as the
// MDS's metric does (copysethealth.Judge).
func mdsCopysetHealth(c *mdspb.Copyset, replicas uint32, byID map[uint64]*mdspb.ChunkServer, p healthParams) *health {
	h := &health{}
	findings := copysethealth.Judge(c, copysethealth.Params{
		Replicas: replicas, MaxLogGap: p.maxLogGap, StaleAfter: p.staleAfter, Now: p.now,
		Member: func(id uint64) (registered, offline bool) {
			cs := byID[id]
			return cs != nil, cs != nil && cs.OnlineState == mdspb.OnlineState_ONLINE_STATE_OFFLINE
		},
		Name: func(id uint64) string { return csName(id, byID) },
	})
	for _, f := range findings {
		h.note(finding{reason: f.Reason, cs: f.CS, silence: f.Silence, behind: f.Behind}, "%s", f.Text)
	}
	return h
}
