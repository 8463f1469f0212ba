package ops

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/mds/mdstest"
	"cairn.io/cairn/nbd"
)

// noDevices is a catalog without devices, for an NBD server that only
// greets.
type noDevices struct{}

func (noDevices) List(context.Context) ([]string, error) { return nil, nil }
func (noDevices) Open(context.Context, string) (blockdev.Device, error) {
	return nil, blockdev.ErrNotFound
}

// startNBD starts an NBD server (a gateway's NBD port) on loopback.
func startNBD(t *testing.T) string {
	t.Helper()
	srv, err := nbd.NewServer(nbd.Config{Exports: noDevices{}, Logger: testlog.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// startMute accepts connections and never says a word.
func startMute(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				_ = c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	return ln.Addr().String()
}

// TestWrongMDSAddress gives --mds the address of servers that are no MDS:
// each is named as such, with what it probably is, at once rather than
// after --timeout, and exits with the unreachable code. An address that
// accepts connections and never answers is named when the time is up.
func TestWrongMDSAddress(t *testing.T) {
	cs := mdstest.StartChunkServerDouble(t, "host-0", "zone-0", "pool0")
	web := httptest.NewServer(http.NotFoundHandler())
	defer web.Close()
	metrics := strings.TrimPrefix(web.URL, "http://")
	nbdAddr := startNBD(t)
	for _, tc := range []struct {
		name, addr, want string
	}{
		{"chunkserver", cs.Addr, cs.Addr + " is not an MDS (it answers as a chunkserver?) — pass the MDS address with --mds (unknown service cairn.mds.v1.TopologyService)"},
		{"metrics port", metrics, metrics + " is not an MDS (it answers HTTP/1.1, not gRPC: a metrics port?) — pass the MDS address with --mds ("},
		{"NBD port", nbdAddr, nbdAddr + " is not an MDS (not a gRPC server: a gateway's NBD or iSCSI port?) — pass the MDS address with --mds (" +
			`connection error: desc = "error reading server preface: http2: frame too large")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			r := runOps(t, "", "--mds", tc.addr, "--timeout", "20s", "list", "zone")
			if r.code != ExitUnreachable || !strings.Contains(r.stderr, "cairn-ops: list zones: no MDS leader answered (tried "+tc.addr+"): "+tc.want) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", r.code, r.stderr, ExitUnreachable, tc.want)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("took %s: a server that is no MDS stays so, the CLI should not wait for --timeout", took)
			}
		})
	}

	t.Run("mute", func(t *testing.T) {
		mute := startMute(t)
		r := runOps(t, "", "--mds", mute, "--timeout", "500ms", "list", "zone")
		want := "cairn-ops: list zones: no MDS leader answered (tried " + mute + "): " + mute + " did not answer in time: context deadline exceeded"
		if r.code != ExitUnreachable || !strings.HasPrefix(r.stderr, want) {
			t.Errorf("exit %d, stderr %q; want exit %d and %q", r.code, r.stderr, ExitUnreachable, want)
		}
	})

	// A wrong address next to the MDS's is passed over.
	t.Run("beside the MDS", func(t *testing.T) {
		c := newDoubleCluster(t, 0)
		r := runOps(t, "", "--mds", cs.Addr+","+c.mds.Addr(), "--timeout", "10s", "list", "zone")
		if r.code != ExitOK {
			t.Errorf("--mds CHUNKSERVER,MDS: exit %d, stderr %q", r.code, r.stderr)
		}
	})
}
