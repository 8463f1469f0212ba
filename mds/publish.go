package mds

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
)

// Publications: the CSI driver's ControllerPublish records on the volume
// which nodes may attach it, and the MDS enforces it where writers are
// admitted, at OpenVolume. A writable publication is the volume's only one:
// its node is the only writer a CSI node plugin may open. Moving the writer
// (unpublishing it, or publishing the volume elsewhere once the old node is
// dead) raises the volume's epoch in the same transaction and waits until
// every chunkserver refuses the old epoch (fenceEpoch), so the old node's
// late writes cannot land after the call returns.

// registerNode records a node (see RegisterNodeRequest).
func (l *leaderState) registerNode(ctx context.Context, r *mdspb.RegisterNodeRequest) (*mdspb.RegisterNodeResponse, error) {
	n := proto.CloneOf(r.GetNode())
	if err := checkName("node name", n.GetName()); err != nil {
		return nil, err
	}
	for k, v := range n.Topology {
		if k == "" || len(k)+len(v) > 512 {
			return nil, status.Errorf(codes.InvalidArgument, "node %q: topology segment %q=%q is empty or too long", n.Name, k, v)
		}
	}
	n.RegisteredUnix = time.Now().Unix()
	if _, err := l.st.txn(ctx, nil, putOp(l.st.k.node(n.Name), n)); err != nil {
		return nil, err
	}
	l.log.Info("node registered", "node", n.Name, "topology", n.Topology)
	return &mdspb.RegisterNodeResponse{Node: n}, nil
}

func (l *leaderState) listNodes(ctx context.Context) (*mdspb.ListNodesResponse, error) {
	nodes, err := list[mdspb.Node](ctx, l.st, l.st.k.nodes())
	if err != nil {
		return nil, err
	}
	return &mdspb.ListNodesResponse{Nodes: nodes}, nil
}

// publishVolume records a publication (see PublishVolumeRequest).
func (l *leaderState) publishVolume(ctx context.Context, r *mdspb.PublishVolumeRequest) (*mdspb.PublishVolumeResponse, error) {
	if err := checkName("node name", r.Node); err != nil {
		return nil, err
	}
	if _, _, err := l.volumeByName(ctx, r.Name); err != nil {
		return nil, err
	}
	found, _, err := l.st.get(ctx, l.st.k.node(r.Node), &mdspb.Node{})
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, status.Errorf(codes.NotFound, "node %q is not registered: no Cairn CSI node plugin has started there", r.Node)
	}
	var (
		fenced    string
		unchanged bool
	)
	v, version, bumped, err := l.updateVolume(ctx, r.Name, nil, func(v *mdspb.Volume) (fenceKind, error) {
		fenced, unchanged = "", false
		if p := publicationOf(v, r.Node); p != nil {
			if p.ReadOnly == r.ReadOnly {
				unchanged = true
				return noFence, errNoChange
			}
			return noFence, status.Errorf(codes.AlreadyExists, "volume %q is already published to node %q %s",
				r.Name, r.Node, accessWord(p.ReadOnly))
		}
		if w := writablePublication(v); w != nil {
			if r.ReadOnly {
				return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is published for writing to node %q; a reader elsewhere would see it change",
					r.Name, w.Node)
			}
			live, err := l.liveWriter(ctx, v, w.Node)
			if err != nil {
				return noFence, err
			}
			if live != nil {
				return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is published for writing to node %q, which has it open (session %s); unpublish it there first",
					r.Name, w.Node, live.SessionId)
			}
			// The old node holds no live session: it died or detached
			// without being unpublished. Take the volume over and fence it.
			fenced = w.Node
			v.Publications = []*mdspb.Publication{{Node: r.Node, PublishedUnix: time.Now().Unix()}}
			return fenceWriters, nil
		}
		if !r.ReadOnly {
			if len(v.Publications) > 0 {
				return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is published read-only to %s; a writer needs it to itself",
					r.Name, publishedTo(v))
			}
			if live, err := l.liveWriter(ctx, v, ""); err != nil {
				return noFence, err
			} else if live != nil {
				return noFence, status.Errorf(codes.FailedPrecondition, "volume %q is open for writing by %q outside the CSI driver (session %s); close it first",
					r.Name, live.Client, live.SessionId)
			}
		}
		v.Publications = append(v.Publications, &mdspb.Publication{Node: r.Node, ReadOnly: r.ReadOnly, PublishedUnix: time.Now().Unix()})
		return noFence, nil
	})
	if err != nil {
		return nil, err
	}
	if unchanged && !r.ReadOnly && v.Epoch > 0 {
		// Published already: the attempt that published it may have taken
		// the volume over and ended before its fence completed.
		if err := l.fenceAgain(ctx, v); err != nil {
			return nil, err
		}
	}
	if version != 0 {
		if err := l.fenceEpoch(ctx, v, version, bumped); err != nil {
			return nil, err
		}
		l.log.Warn("volume taken over from a node without a live session; the node is fenced",
			"volume", r.Name, "node", r.Node, "fenced_node", fenced, "epoch", v.Epoch)
	} else {
		l.log.Info("volume published", "volume", r.Name, "node", r.Node, "read_only", r.ReadOnly)
	}
	return &mdspb.PublishVolumeResponse{Volume: v}, nil
}

// unpublishVolume removes publications (see UnpublishVolumeRequest).
func (l *leaderState) unpublishVolume(ctx context.Context, r *mdspb.UnpublishVolumeRequest) (*mdspb.UnpublishVolumeResponse, error) {
	if r.Node != "" {
		if err := checkName("node name", r.Node); err != nil {
			return nil, err
		}
	}
	v, version, bumped, err := l.updateVolume(ctx, r.Name, nil, func(v *mdspb.Volume) (fenceKind, error) {
		fence := noFence
		kept := v.Publications[:0:0]
		for _, p := range v.Publications {
			if r.Node == "" || p.Node == r.Node {
				if !p.ReadOnly {
					fence = fenceWriters
				}
				continue
			}
			kept = append(kept, p)
		}
		if len(kept) == len(v.Publications) {
			return noFence, errNoChange
		}
		v.Publications = kept
		return fence, nil
	})
	if err != nil {
		return nil, err
	}
	switch {
	case version != 0:
		if err := l.fenceEpoch(ctx, v, version, bumped); err != nil {
			return nil, err
		}
		l.log.Info("volume unpublished; the node is fenced", "volume", r.Name, "node", r.Node, "epoch", v.Epoch)
	case writablePublication(v) == nil && v.Epoch > 0:
		// Nothing left to remove: an earlier attempt may have removed a
		// writable publication and ended before its fence completed. The
		// node is not unpublished until it is fenced.
		if err := l.fenceAgain(ctx, v); err != nil {
			return nil, err
		}
	}
	return &mdspb.UnpublishVolumeResponse{Volume: v}, nil
}

// liveWriter returns a live writable session of v at its current epoch
// opened from node (node "" matches sessions opened outside CSI), or nil.
func (l *leaderState) liveWriter(ctx context.Context, v *mdspb.Volume, node string) (*mdspb.Session, error) {
	sessions, err := l.liveSessions(ctx, v.Id)
	if err != nil {
		return nil, err
	}
	for _, s := range sessions {
		if s.Writable && s.Node == node && s.Epoch >= writerEpoch(v) {
			return s, nil
		}
	}
	return nil, nil
}

// checkPublishedOpen admits an open of v from node (empty outside CSI).
func checkPublishedOpen(v *mdspb.Volume, node string, writable bool) error {
	if node == "" {
		if w := writablePublication(v); w != nil && writable {
			return status.Errorf(codes.FailedPrecondition, "volume %q is published for writing to node %q; unpublish it before opening it for writing elsewhere",
				v.Name, w.Node)
		}
		return nil
	}
	p := publicationOf(v, node)
	switch {
	case p == nil:
		return status.Errorf(codes.FailedPrecondition, "volume %q is not published to node %q", v.Name, node)
	case writable && p.ReadOnly:
		return status.Errorf(codes.FailedPrecondition, "volume %q is published read-only to node %q", v.Name, node)
	}
	return nil
}

func publicationOf(v *mdspb.Volume, node string) *mdspb.Publication {
	for _, p := range v.Publications {
		if p.Node == node {
			return p
		}
	}
	return nil
}

func writablePublication(v *mdspb.Volume) *mdspb.Publication {
	for _, p := range v.Publications {
		if !p.ReadOnly {
			return p
		}
	}
	return nil
}

// publishedTo names the nodes a volume is published to, for errors.
func publishedTo(v *mdspb.Volume) string {
	var nodes []string
	for _, p := range v.Publications {
		nodes = append(nodes, fmt.Sprintf("node %q %s", p.Node, accessWord(p.ReadOnly)))
	}
	slices.Sort(nodes)
	return strings.Join(nodes, ", ")
}

func accessWord(readOnly bool) string {
	if readOnly {
		return "read-only"
	}
	return "for writing"
}
