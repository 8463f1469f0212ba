package ops

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
)

// maxVolumesMapped bounds the volumes whose segments status reads to name
// the volumes a problem touches.
const maxVolumesMapped = 256

// Names shown in one problem line before "and N more".
const (
	copysetsNamed = 4
	volumesNamed  = 8
)

// causes groups what is wrong by root cause, for status. One chunkserver
// that is down, paused or behind shows in every copyset it is a member of,
// with figures (how long unheard, how far behind) that differ from copyset
// to copyset: it is one cause, with the copysets counted, the largest
// figure shown and the volumes named. A problem about a copyset itself (no
// leader has reported) groups by its sentence, and copysets no chunkserver
// can repair group with the chunkserver cause they belong to, else by the
// reason the schedulers give.
type causes struct {
	byCS map[uint64]*csCause
	// other holds the problems about copysets themselves, by sentence, in
	// the order first seen.
	other   []*sentenceCause
	blocked []*mdspb.BlockedCopyset
}

// csCause is what one chunkserver does to the copysets it is a member of.
type csCause struct {
	id uint64
	// state is the chunkserver's own state when it is not online
	// ("offline", "unstable", ...); empty when online.
	state    string
	refs     []*commonpb.CopysetRef
	seen     map[uint64]bool
	byReason map[string]int
	findings int
	silence  time.Duration
	behind   uint64
	details  []string
	blocked  []*mdspb.BlockedCopyset
}

// sentenceCause is one sentence shared by several copysets.
type sentenceCause struct {
	text string
	refs []*commonpb.CopysetRef
}

// problemLine is one problem sentence of status with the per-copyset lines
// behind it.
type problemLine struct {
	text    string
	details []string
}

func (c *causes) cause(id uint64) *csCause {
	if c.byCS == nil {
		c.byCS = map[uint64]*csCause{}
	}
	cc := c.byCS[id]
	if cc == nil {
		cc = &csCause{id: id, seen: map[uint64]bool{}, byReason: map[string]int{}}
		c.byCS[id] = cc
	}
	return cc
}

// chunkserver records a chunkserver that is not online: a cause even when
// it holds no copyset.
func (c *causes) chunkserver(id uint64, state string) { c.cause(id).state = state }

// add records the findings of one unhealthy copyset.
func (c *causes) add(ref *commonpb.CopysetRef, findings []finding) {
	counted := map[string]bool{}
	for _, f := range findings {
		if f.cs == 0 {
			c.addSentence(ref, f.text)
			continue
		}
		cc := c.cause(f.cs)
		if !cc.seen[ref.Key()] {
			cc.seen[ref.Key()] = true
			cc.refs = append(cc.refs, ref)
		}
		if key := fmt.Sprint(f.cs, f.reason); !counted[key] {
			counted[key] = true
			cc.byReason[f.reason]++
		}
		cc.findings++
		cc.silence, cc.behind = max(cc.silence, f.silence), max(cc.behind, f.behind)
		cc.details = append(cc.details, ref.Name()+": "+f.text)
	}
}

func (c *causes) addSentence(ref *commonpb.CopysetRef, text string) {
	for _, s := range c.other {
		if s.text == text {
			s.refs = append(s.refs, ref)
			return
		}
	}
	c.other = append(c.other, &sentenceCause{text: text, refs: []*commonpb.CopysetRef{ref}})
}

// report turns the causes into problem lines: chunkservers by id, then the
// problems of copysets themselves, then copysets that cannot be repaired for
// no chunkserver's sake. It names the volumes with chunks in the copysets
// concerned.
func (a *app) reportCauses(ctx context.Context, c *causes, topo *topology, vols []*mdspb.Volume) []problemLine {
	ids := make([]uint64, 0, len(c.byCS))
	for id := range c.byCS {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	// A copyset that cannot be repaired belongs to the cause of every
	// chunkserver it is unhealthy for; the rest group by the reason.
	var loose []*mdspb.BlockedCopyset
	for _, b := range c.blocked {
		owned := false
		for _, id := range ids {
			if cc := c.byCS[id]; cc.seen[b.Copyset.Key()] {
				cc.blocked = append(cc.blocked, b)
				owned = true
			}
		}
		if !owned {
			loose = append(loose, b)
		}
	}
	if len(ids) == 0 && len(c.other) == 0 && len(loose) == 0 {
		return nil
	}
	byCopyset := a.volumesByCopyset(ctx, vols)
	var out []problemLine
	for _, id := range ids {
		out = append(out, c.byCS[id].line(topo, byCopyset))
	}
	for _, s := range c.other {
		out = append(out, s.line(byCopyset))
	}
	for _, g := range groupBlocked(loose) {
		out = append(out, g.line(byCopyset))
	}
	return out
}

// line is the cause as one sentence, with the per-copyset sentences as its
// details.
func (cc *csCause) line(topo *topology, byCopyset map[uint64][]string) problemLine {
	details := append([]string{}, cc.details...)
	for _, b := range cc.blocked {
		details = append(details, b.Copyset.Name()+": cannot be repaired now: "+b.Reason)
	}
	vols := volumesSuffix(cc.refs, byCopyset)
	// A chunkserver that is online and troubles one copyset in one way is
	// that copyset's problem.
	if cc.state == "" && cc.findings == 1 && len(cc.blocked) == 0 {
		return problemLine{text: "copyset " + cc.details[0] + vols}
	}
	var b strings.Builder
	b.WriteString(chunkserverLabel(cc.id, topo))
	var state []string
	if cc.state != "" {
		state = append(state, "is "+cc.state)
	}
	if cc.silence > 0 {
		state = append(state, "silent for "+cc.silence.Truncate(time.Second).String())
	}
	if len(state) > 0 {
		b.WriteString(" " + strings.Join(state, ", "))
	}
	if len(cc.refs) == 0 {
		return problemLine{text: b.String()}
	}
	b.WriteString(": " + cc.summary() + " (" + nameCopysets(cc.refs) + ")")
	if len(cc.blocked) > 0 {
		fmt.Fprintf(&b, ", %d of them cannot be repaired now: %s", len(cc.blocked), blockedReasons(cc.blocked))
	}
	b.WriteString(vols)
	return problemLine{text: b.String(), details: details}
}

// summary counts the copysets by what the chunkserver does to them:
// "100 copysets under-replicated", or with several reasons "100 copysets
// unhealthy: 100 without this replica, 33 without a leader".
func (cc *csCause) summary() string {
	phrase := func(reason string) string {
		switch reason {
		case reasonPeersOffline:
			return "without this replica"
		case reasonNoLeader:
			return "without a leader"
		case reasonUnderReplicated:
			return "under-replicated"
		case reasonLogGap:
			return fmt.Sprintf("lagging (up to %d entries behind)", cc.behind)
		case reasonInstallingSnapshot:
			return "receiving a snapshot"
		default:
			return reason
		}
	}
	order := []string{reasonPeersOffline, reasonNoLeader, reasonUnderReplicated, reasonLogGap, reasonInstallingSnapshot}
	for r := range cc.byReason {
		if !slices.Contains(order, r) {
			order = append(order, r)
		}
	}
	var parts []string
	for _, r := range order {
		if n := cc.byReason[r]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, phrase(r)))
		}
	}
	if len(parts) == 1 {
		for r := range cc.byReason {
			return plural(len(cc.refs), "copyset") + " " + phrase(r)
		}
	}
	return plural(len(cc.refs), "copyset") + " unhealthy: " + strings.Join(parts, ", ")
}

func (s *sentenceCause) line(byCopyset map[uint64][]string) problemLine {
	vols := volumesSuffix(s.refs, byCopyset)
	if len(s.refs) == 1 {
		return problemLine{text: fmt.Sprintf("copyset %s: %s%s", s.refs[0].Name(), s.text, vols)}
	}
	details := make([]string, 0, len(s.refs))
	for _, ref := range s.refs {
		details = append(details, ref.Name()+": "+s.text)
	}
	return problemLine{text: fmt.Sprintf("%s: %s (%s)%s", s.text, plural(len(s.refs), "copyset"), nameCopysets(s.refs), vols), details: details}
}

// blockedGroup is the copysets that cannot be repaired for one reason.
type blockedGroup struct {
	reason string
	refs   []*commonpb.CopysetRef
}

func groupBlocked(bs []*mdspb.BlockedCopyset) []*blockedGroup {
	var out []*blockedGroup
	for _, b := range bs {
		i := slices.IndexFunc(out, func(g *blockedGroup) bool { return g.reason == b.Reason })
		if i < 0 {
			out = append(out, &blockedGroup{reason: b.Reason})
			i = len(out) - 1
		}
		out[i].refs = append(out[i].refs, b.Copyset)
	}
	return out
}

func (g *blockedGroup) line(byCopyset map[uint64][]string) problemLine {
	vols := volumesSuffix(g.refs, byCopyset)
	if len(g.refs) == 1 {
		return problemLine{text: fmt.Sprintf("copyset %s cannot be repaired now: %s%s", g.refs[0].Name(), g.reason, vols)}
	}
	details := make([]string, 0, len(g.refs))
	for _, ref := range g.refs {
		details = append(details, ref.Name()+": cannot be repaired now: "+g.reason)
	}
	return problemLine{
		text:    fmt.Sprintf("%s cannot be repaired now: %s (%s)%s", plural(len(g.refs), "copyset"), g.reason, nameCopysets(g.refs), vols),
		details: details,
	}
}

// blockedReasons says why copysets cannot be repaired: the reason, or with
// several the count of each.
func blockedReasons(bs []*mdspb.BlockedCopyset) string {
	groups := groupBlocked(bs)
	if len(groups) == 1 {
		return groups[0].reason
	}
	parts := make([]string, 0, len(groups))
	for _, g := range groups {
		parts = append(parts, fmt.Sprintf("%d: %s", len(g.refs), g.reason))
	}
	return strings.Join(parts, "; ")
}

// chunkserverLabel names a chunkserver with its host, address and zone.
func chunkserverLabel(id uint64, topo *topology) string {
	cs := topo.csByID[id]
	if cs == nil {
		return fmt.Sprintf("chunkserver %d (not registered)", id)
	}
	return fmt.Sprintf("chunkserver %d (%s, %s, zone %s)", cs.Id, cs.Hostname, cs.Address, cs.Zone)
}

// nameCopysets names the first few copysets: "1:1, 1:4, 1:7, 1:9 and 96
// more".
func nameCopysets(refs []*commonpb.CopysetRef) string {
	names := make([]string, 0, copysetsNamed)
	for _, ref := range refs[:min(len(refs), copysetsNamed)] {
		names = append(names, ref.Name())
	}
	return andMore(names, len(refs))
}

func andMore(names []string, total int) string {
	s := strings.Join(names, ", ")
	if total > len(names) {
		s += fmt.Sprintf(" and %d more", total-len(names))
	}
	return s
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// volumesSuffix names the volumes with chunks in the copysets.
func volumesSuffix(refs []*commonpb.CopysetRef, byCopyset map[uint64][]string) string {
	if byCopyset == nil {
		return fmt.Sprintf("; volumes not looked up (more than %d)", maxVolumesMapped)
	}
	var touched []string
	for _, ref := range refs {
		for _, v := range byCopyset[ref.Key()] {
			if !slices.Contains(touched, v) {
				touched = append(touched, v)
			}
		}
	}
	if len(touched) == 0 {
		return ""
	}
	slices.Sort(touched)
	return "; volumes: " + andMore(touched[:min(len(touched), volumesNamed)], len(touched))
}

// volumesByCopyset maps each copyset to the volumes with chunks in it; nil
// when there are too many volumes to read. A volume whose segments cannot
// be read is left out.
func (a *app) volumesByCopyset(ctx context.Context, vols []*mdspb.Volume) map[uint64][]string {
	if len(vols) > maxVolumesMapped {
		return nil
	}
	out := map[uint64][]string{}
	for _, v := range vols {
		if v.Status == mdspb.VolumeStatus_VOLUME_STATUS_DELETING || v.AllocatedSegments == 0 {
			continue
		}
		cctx, cancel := a.callCtx(ctx)
		segs, err := a.conn.Volumes().ListSegments(cctx, &mdspb.ListSegmentsRequest{Name: v.Name})
		cancel()
		if err != nil {
			continue
		}
		for _, seg := range segs.Segments {
			for _, ch := range seg.Chunks {
				key := ch.Copyset.Key()
				if names := out[key]; len(names) == 0 || names[len(names)-1] != v.Name {
					out[key] = append(out[key], v.Name)
				}
			}
		}
	}
	return out
}
