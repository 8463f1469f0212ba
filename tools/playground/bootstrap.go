package playground

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/poll"
	"cairn.io/cairn/internal/units"
	"cairn.io/cairn/mds/mdsclient"
)

// The steps that bring a started playground to a usable cluster: healthy
// daemons, online chunkservers, a formatted logical pool and the volume.

// waitHealthy waits for a child's /healthz to answer 200 (and, if given,
// accept's approval of the body).
func (pg *Playground) waitHealthy(ctx context.Context, c *child, accept func(string) bool) error {
	url := "http://" + c.state.MetricsAddr + "/healthz"
	client := &http.Client{Timeout: 2 * time.Second}
	err := poll.Until(ctx, c.name+" to report healthy", func() error {
		resp, err := client.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		body := strings.TrimSpace(string(b))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %d %s", url, resp.StatusCode, body)
		}
		if accept != nil && !accept(body) {
			return fmt.Errorf("%s: %s", url, body)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w; see %s", err, c.logPath)
	}
	return nil
}

// waitChunkServersOnline waits until the MDS has a heartbeat of each of the
// playground's chunkservers.
func (pg *Playground) waitChunkServersOnline(ctx context.Context, conn *mdsclient.Conn) error {
	return poll.Until(ctx, "the chunkservers to heartbeat to the MDS", func() error {
		online, err := conn.OnlineChunkServers(ctx)
		if err != nil {
			return err
		}
		for _, c := range pg.css {
			if !online[c.state.Addr] {
				return fmt.Errorf("chunkserver %s (%s) not online yet", c.name, c.state.Addr)
			}
		}
		return nil
	})
}

// ensurePool creates the logical pool if absent and waits until it is
// ready and every copyset's leader has reported since this start.
func (pg *Playground) ensurePool(ctx context.Context, conn *mdsclient.Conn) error {
	pools, err := conn.Topology().ListPools(ctx, &mdspb.ListPoolsRequest{})
	if err != nil {
		return fmt.Errorf("list pools: %w", err)
	}
	var pool *mdspb.LogicalPool
	for _, lp := range pools.GetLogicalPools() {
		if lp.GetName() == LogicalPool {
			pool = lp
		}
	}
	if pool == nil {
		pg.log.Info("creating logical pool", "name", LogicalPool, "copysets_per_chunkserver", pg.cfg.CopysetsPerChunkServer)
		err := poll.Until(ctx, "the logical pool to be created", func() error {
			resp, err := conn.Topology().CreateLogicalPool(ctx, &mdspb.CreateLogicalPoolRequest{
				Name: LogicalPool, PhysicalPool: PhysicalPool, CopysetsPerChunkserver: pg.cfg.CopysetsPerChunkServer})
			if err != nil {
				if status.Code(err) == codes.InvalidArgument {
					return backoffStop{err}
				}
				return err
			}
			pool = resp.GetPool()
			return nil
		})
		if err != nil {
			return unwrapStop(err)
		}
	}
	since := pg.startedAt().Unix()
	return poll.Until(ctx, "every copyset to have a leader", func() error {
		pools, err := conn.Topology().ListPools(ctx, &mdspb.ListPoolsRequest{})
		if err != nil {
			return err
		}
		for _, lp := range pools.GetLogicalPools() {
			if lp.GetName() == LogicalPool && lp.GetStatus() != mdspb.LogicalPoolStatus_LOGICAL_POOL_STATUS_READY {
				return fmt.Errorf("logical pool %s is %v", LogicalPool, lp.GetStatus())
			}
		}
		resp, err := conn.Topology().ListCopysets(ctx, &mdspb.ListCopysetsRequest{LogicalPoolId: pool.GetId()})
		if err != nil {
			return err
		}
		if len(resp.GetCopysets()) == 0 {
			return errors.New("no copysets")
		}
		waiting := 0
		for _, cs := range resp.GetCopysets() {
			if cs.GetLeaderId() == 0 || cs.GetReportedUnix() < since {
				waiting++
			}
		}
		if waiting > 0 {
			return fmt.Errorf("%d of %d copysets have no leader reported since the start", waiting, len(resp.GetCopysets()))
		}
		return nil
	})
}

// backoffStop ends poll's retries at once.
type backoffStop struct{ error }

func unwrapStop(err error) error {
	var s backoffStop
	if errors.As(err, &s) {
		return s.error
	}
	return err
}

// ensureVolume creates the playground's volume if absent.
func (pg *Playground) ensureVolume(ctx context.Context, conn *mdsclient.Conn) error {
	name := pg.cfg.Volume
	var vol *mdspb.Volume
	err := poll.Until(ctx, "volume "+name, func() error {
		st, err := conn.Volumes().StatVolume(ctx, &mdspb.StatVolumeRequest{Name: name})
		if err == nil {
			vol = st.GetVolume()
			return nil
		}
		if status.Code(err) != codes.NotFound {
			return err
		}
		resp, err := conn.Volumes().CreateVolume(ctx, &mdspb.CreateVolumeRequest{
			Name: name, Size: pg.cfg.VolumeSize, Owner: "playground", Pool: LogicalPool})
		switch status.Code(err) {
		case codes.OK:
			pg.log.Info("created volume", "name", name, "size", units.FormatBytes(resp.GetVolume().GetSize()))
			vol = resp.GetVolume()
			return nil
		case codes.InvalidArgument:
			return backoffStop{fmt.Errorf("create volume %s: %w", name, err)}
		}
		return err
	})
	if err != nil {
		return unwrapStop(err)
	}
	pg.mu.Lock()
	pg.mu.volume = VolumeState{
		Name:     name,
		Size:     vol.GetSize(),
		NBDURL:   fmt.Sprintf("nbd://%s/%s", loopback(pg.ports.NBD), name),
		ISCSIURL: fmt.Sprintf("iscsi://%s/%s:%s/0", loopback(pg.ports.ISCSI), IQNPrefix, name),
	}
	pg.mu.Unlock()
	return nil
}
