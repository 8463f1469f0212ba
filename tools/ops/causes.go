package ops

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"cairn.io/cairn/api/commonpb"
	"cairn.io/cairn/api/mdspb"
)

// maxVolumesMapped bounds the volumes whose segments status reads to name
// the volumes a problem touches.
const maxVolumesMapped = 256

// causes groups the problems of unhealthy copysets by what they say: one
// cause (a chunkserver offline, a leader that does not hear from a member)
// shows in every copyset it touches, and is one line, with the copysets
// counted and the volumes named.
type causes struct {
	order    []string
	copysets map[string][]*commonpb.CopysetRef
}

func (c *causes) add(ref *commonpb.CopysetRef, sentences []string) {
	if c.copysets == nil {
		c.copysets = map[string][]*commonpb.CopysetRef{}
	}
	for _, s := range sentences {
		if _, ok := c.copysets[s]; !ok {
			c.order = append(c.order, s)
		}
		c.copysets[s] = append(c.copysets[s], ref)
	}
}

// report turns the groups into problem sentences, naming the volumes with
// chunks in the copysets concerned.
func (a *app) reportCauses(ctx context.Context, c *causes, vols []*mdspb.Volume, problem func(string, ...any)) {
	if len(c.order) == 0 {
		return
	}
	byCopyset := a.volumesByCopyset(ctx, vols)
	for _, s := range c.order {
		refs := c.copysets[s]
		var touched []string
		for _, ref := range refs {
			for _, v := range byCopyset[ref.Key()] {
				if !slices.Contains(touched, v) {
					touched = append(touched, v)
				}
			}
		}
		slices.Sort(touched)
		suffix := ""
		switch {
		case byCopyset == nil:
			suffix = fmt.Sprintf(" (volumes not looked up: more than %d)", maxVolumesMapped)
		case len(touched) > 0:
			suffix = " (volumes " + strings.Join(touched, ", ") + ")"
		}
		if len(refs) == 1 {
			problem("copyset %s: %s%s", refs[0].Name(), s, suffix)
			continue
		}
		names := make([]string, 0, 4)
		for _, ref := range refs[:min(len(refs), 4)] {
			names = append(names, ref.Name())
		}
		list := strings.Join(names, ", ")
		if len(refs) > 4 {
			list += fmt.Sprintf(" and %d more", len(refs)-4)
		}
		problem("%s: %d copysets (%s)%s", s, len(refs), list, suffix)
	}
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
