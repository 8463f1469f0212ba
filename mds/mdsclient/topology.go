package mdsclient

import (
	"context"
	"fmt"

	"cairn.io/cairn/api/mdspb"
)

// OnlineChunkServers returns the addresses of the chunkservers the MDS
// counts ONLINE (heartbeating in time).
func (c *Conn) OnlineChunkServers(ctx context.Context) (map[string]bool, error) {
	resp, err := c.Topology().ListChunkServers(ctx, &mdspb.ListChunkServersRequest{})
	if err != nil {
		return nil, fmt.Errorf("list chunkservers: %w", err)
	}
	online := map[string]bool{}
	for _, cs := range resp.GetChunkservers() {
		if cs.GetOnlineState() == mdspb.OnlineState_ONLINE_STATE_ONLINE {
			online[cs.GetAddress()] = true
		}
	}
	return online, nil
}
