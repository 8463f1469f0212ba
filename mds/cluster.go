package mds

import (
	"context"
	"sort"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	"cairn.io/cairn/api/mdspb"
)

// clusterStatus lists the MDS processes in the election (the first created
// key leads) and the etcd members.
func (l *leaderState) clusterStatus(ctx context.Context) (*mdspb.GetClusterStatusResponse, error) {
	out := &mdspb.GetClusterStatusResponse{Constants: proto.CloneOf(l.consts)}
	resp, err := l.st.cli.Get(ctx, l.st.k.election(), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
	if err != nil {
		return nil, err
	}
	for i, kv := range resp.Kvs {
		out.Mds = append(out.Mds, &mdspb.MDSInstance{Address: string(kv.Value), Leader: i == 0})
	}
	members, err := l.st.cli.MemberList(ctx)
	if err != nil {
		return nil, err
	}
	var leaderID uint64
	for _, ep := range l.st.cli.Endpoints() {
		if st, err := l.st.cli.Status(ctx, ep); err == nil {
			leaderID = st.Leader
			break
		}
	}
	for _, m := range members.Members {
		urls := m.ClientURLs
		if len(members.Members) == 1 && allPortZero(urls) {
			// An embedded etcd started on a free port advertises the port
			// it was configured with (0); report the one it is reached at.
			urls = l.st.cli.Endpoints()
		}
		out.Etcd = append(out.Etcd, &mdspb.EtcdMember{Name: m.Name, ClientUrls: urls, Leader: m.ID == leaderID})
	}
	sort.Slice(out.Etcd, func(i, j int) bool { return out.Etcd[i].Name < out.Etcd[j].Name })
	return out, nil
}

func allPortZero(urls []string) bool {
	for _, u := range urls {
		if !strings.HasSuffix(u, ":0") {
			return false
		}
	}
	return len(urls) > 0
}
