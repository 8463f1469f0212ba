package embedetcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// ErrNotLoopback is returned when a listen address is not on loopback.
var ErrNotLoopback = errors.New("embedetcd: listen address is not loopback")

// Config says where the embedded etcd keeps its data and listens.
type Config struct {
	// Dir holds etcd's data (created if missing).
	Dir string
	// ClientAddr is host:port for clients; default 127.0.0.1:0 (ephemeral).
	ClientAddr string
	// PeerAddr is host:port for the (unused, single-node) peer listener;
	// default 127.0.0.1:0.
	PeerAddr string
	// StartTimeout bounds the wait for etcd to be ready; default 30s.
	StartTimeout time.Duration
}

// Etcd is a running embedded etcd.
type Etcd struct {
	e        *embed.Etcd
	endpoint string
}

// Start launches etcd and waits until it serves.
func Start(ctx context.Context, cfg Config) (*Etcd, error) {
	if cfg.Dir == "" {
		return nil, errors.New("embedetcd: no data directory")
	}
	if cfg.ClientAddr == "" {
		cfg.ClientAddr = "127.0.0.1:0"
	}
	if cfg.PeerAddr == "" {
		cfg.PeerAddr = "127.0.0.1:0"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	curl, err := loopbackURL(cfg.ClientAddr)
	if err != nil {
		return nil, err
	}
	purl, err := loopbackURL(cfg.PeerAddr)
	if err != nil {
		return nil, err
	}
	ec := embed.NewConfig()
	ec.Name = "cairn-mds"
	ec.Dir = cfg.Dir
	ec.ListenClientUrls = []url.URL{*curl}
	ec.AdvertiseClientUrls = []url.URL{*curl}
	ec.ListenPeerUrls = []url.URL{*purl}
	ec.AdvertisePeerUrls = []url.URL{*purl}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	// Keep the history short: the MDS never reads old revisions.
	ec.AutoCompactionMode = embed.CompactorModeRevision
	ec.AutoCompactionRetention = "10000"
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: start in %s: %w", cfg.Dir, err)
	}
	t := time.NewTimer(cfg.StartTimeout)
	defer t.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedetcd: start in %s: %w", cfg.Dir, err)
	case <-t.C:
		e.Close()
		return nil, fmt.Errorf("embedetcd: not ready after %s", cfg.StartTimeout)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("embedetcd: start: %w", ctx.Err())
	}
	if len(e.Clients) == 0 {
		e.Close()
		return nil, errors.New("embedetcd: no client listener")
	}
	return &Etcd{e: e, endpoint: "http://" + e.Clients[0].Addr().String()}, nil
}

// Endpoints returns the client URLs to dial.
func (e *Etcd) Endpoints() []string { return []string{e.endpoint} }

// Close stops etcd and waits for it to release its data directory.
func (e *Etcd) Close() { e.e.Close() }

func loopbackURL(addr string) (*url.URL, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: listen address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("%w: %q", ErrNotLoopback, addr)
	}
	return &url.URL{Scheme: "http", Host: addr}, nil
}
