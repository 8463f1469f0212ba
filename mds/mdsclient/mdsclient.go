package mdsclient

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/internal/certs"
)

// ErrNoAddress is returned by Dial when no MDS address is given.
var ErrNoAddress = errors.New("mdsclient: no MDS address")

// Options tune a Conn. Zero values take the defaults.
type Options struct {
	// TLS is this process's identity for mutual TLS; nil: plaintext.
	TLS *certs.Source
	// DialOptions are added to every connection, after the transport
	// security TLS selects.
	DialOptions []grpc.DialOption
	// RetryBudget bounds the retries of one call whose context has no
	// deadline; default 30s.
	RetryBudget time.Duration
	// InitialBackoff is the first pause after every address failed; it
	// doubles up to MaxBackoff. Defaults 50ms and 2s.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
	// Logger receives a line per leader change; default slog.Default().
	Logger *slog.Logger
}

// Conn is a set of connections to the MDS processes of one cluster that sends
// every call to the leader.
type Conn struct {
	opts Options

	mu struct {
		sync.Mutex
		addrs  []string // known addresses, in the order given, then learned
		conns  map[string]*grpc.ClientConn
		leader string // address believed to lead; "" when unknown
		closed bool
	}
}

var _ grpc.ClientConnInterface = (*Conn)(nil)

// Dial prepares connections to the given MDS addresses. It does not wait for
// any of them; the first call finds the leader.
func Dial(addrs []string, opts Options) (*Conn, error) {
	var clean []string
	seen := map[string]bool{}
	for _, a := range addrs {
		for _, part := range strings.Split(a, ",") {
			part = strings.TrimSpace(part)
			if part != "" && !seen[part] {
				seen[part] = true
				clean = append(clean, part)
			}
		}
	}
	if len(clean) == 0 {
		return nil, ErrNoAddress
	}
	if opts.RetryBudget == 0 {
		opts.RetryBudget = 30 * time.Second
	}
	if opts.InitialBackoff == 0 {
		opts.InitialBackoff = 50 * time.Millisecond
	}
	if opts.MaxBackoff == 0 {
		opts.MaxBackoff = 2 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	opts.DialOptions = append([]grpc.DialOption{certs.DialOption(opts.TLS, certs.RoleMDS)}, opts.DialOptions...)
	c := &Conn{opts: opts}
	c.mu.addrs = clean
	c.mu.conns = map[string]*grpc.ClientConn{}
	c.mu.leader = clean[0]
	return c, nil
}

// Leader returns the address the Conn currently sends calls to.
func (c *Conn) Leader() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.leader
}

// Addresses returns every MDS address the Conn knows, including ones learned
// from redirects.
func (c *Conn) Addresses() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.mu.addrs...)
}

// Close closes every connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.mu.closed = true
	var errs []error
	for a, cc := range c.mu.conns {
		if err := cc.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", a, err))
		}
	}
	c.mu.conns = map[string]*grpc.ClientConn{}
	return errors.Join(errs...)
}

// conn returns the connection to addr, creating it on first use.
func (c *Conn) conn(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.closed {
		return nil, status.Error(codes.Canceled, "mdsclient: connection closed")
	}
	if cc, ok := c.mu.conns[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr, c.opts.DialOptions...)
	if err != nil {
		return nil, fmt.Errorf("mdsclient: dial %s: %w", addr, err)
	}
	c.mu.conns[addr] = cc
	return cc, nil
}

// follow records addr as the leader, adding it to the known addresses.
func (c *Conn) follow(addr string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	known := false
	for _, a := range c.mu.addrs {
		if a == addr {
			known = true
			break
		}
	}
	if !known {
		c.mu.addrs = append(c.mu.addrs, addr)
	}
	if c.mu.leader != addr {
		c.opts.Logger.Info("mds leader changed", "from", c.mu.leader, "to", addr)
		c.mu.leader = addr
	}
}

// next moves on from a failed address to the following known one and reports
// whether that completed a round over every address.
func (c *Conn) next(failed string) (wrapped bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.leader != failed {
		return false // someone else already moved on
	}
	for i, a := range c.mu.addrs {
		if a == failed {
			j := (i + 1) % len(c.mu.addrs)
			c.mu.leader = c.mu.addrs[j]
			return j == 0
		}
	}
	c.mu.leader = c.mu.addrs[0]
	return true
}

// Invoke sends a unary call to the leader, following redirects and retrying
// UNAVAILABLE answers. An address that answers but is no MDS (another
// gRPC server, or no gRPC server at all) is passed over like one that does
// not answer, and once every address known answered so the call fails at
// once, UNAVAILABLE, naming them: that does not pass with time. A call the
// context's deadline cut short fails naming the addresses tried.
func (c *Conn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.RetryBudget)
		defer cancel()
	}
	backoff := c.opts.InitialBackoff
	var tried []string
	var lastErr error
	var tlsSince time.Time // since when every attempt failed for TLS reasons
	redirects := 0
	notMDS := map[string]bool{}
	for {
		addr := c.Leader()
		if !contains(tried, addr) {
			tried = append(tried, addr)
		}
		cc, err := c.conn(addr)
		if err != nil {
			return err
		}
		err = cc.Invoke(ctx, method, args, reply, opts...)
		if err == nil {
			return nil
		}
		if why, ok := notAnMDS(err); ok {
			notMDS[addr] = true
			err = status.Errorf(codes.Unavailable, "%s is not an MDS: %s", addr, why)
			if all(c.Addresses(), notMDS) {
				return status.Errorf(codes.Unavailable, "mdsclient: %s: no MDS leader answered (tried %s): %s",
					method, strings.Join(tried, ", "), status.Convert(err).Message())
			}
		}
		if status.Code(err) == codes.DeadlineExceeded && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			// The deadline passed while this address was asked (or
			// connected to): say which.
			return status.Errorf(codes.DeadlineExceeded, "mdsclient: %s: no MDS leader answered (tried %s): %s did not answer in time: %s",
				method, strings.Join(tried, ", "), addr, status.Convert(err).Message())
		}
		if status.Code(err) != codes.Unavailable {
			return err
		}
		lastErr = err
		// A certificate refused on either side, or a plaintext client
		// hung up on by TLS servers, stays so: once every MDS answered so
		// for a second (not a blip of a restarting one), say why at once
		// rather than retrying for the whole budget.
		refused, plainToTLS := certificateRefused(err), c.opts.TLS == nil && closedBeforePreface(err)
		switch {
		case !refused && !plainToTLS:
			tlsSince = time.Time{}
		case tlsSince.IsZero():
			tlsSince = time.Now()
		case len(tried) >= len(c.Addresses()) && time.Since(tlsSince) >= tlsPersist && refused:
			return status.Errorf(codes.Unauthenticated, "mdsclient: %s: TLS with %s failed: %s",
				method, strings.Join(tried, ", "), status.Convert(err).Message())
		case len(tried) >= len(c.Addresses()) && time.Since(tlsSince) >= tlsPersist:
			return status.Errorf(codes.Unavailable, "mdsclient: %s: %s closed the connection at once: it probably requires TLS (give --tls-cert, --tls-key and --tls-ca)",
				method, strings.Join(tried, ", "))
		}
		if ctx.Err() != nil {
			break
		}
		if leader, ok := NotLeaderAddress(err); ok && leader != "" && leader != addr && redirects <= len(c.Addresses()) {
			// The answer came from a live MDS that names the leader: go
			// there at once, but not round and round for ever.
			redirects++
			c.follow(leader)
			continue
		}
		redirects = 0
		if c.next(addr) {
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
			backoff = min(backoff*2, c.opts.MaxBackoff)
			if ctx.Err() != nil {
				break
			}
		}
	}
	return status.Errorf(codes.Unavailable, "mdsclient: %s: no MDS leader answered (tried %s): %v",
		method, strings.Join(tried, ", "), status.Convert(lastErr).Message())
}

// tlsPersist is how long TLS failures must last before a call gives up on
// them.
const tlsPersist = time.Second

// certificateRefused reports whether err is gRPC's report of a
// certificate refused: the server's by this process (x509 verification,
// the server's role) or this process's own (expired here, or the server's
// alert). A connection that merely broke is not one.
func certificateRefused(err error) bool {
	msg := status.Convert(err).Message()
	for _, s := range []string{"x509:", "this process's certificate", "does not have the", "remote error: tls:"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// notAnMDS reports whether err is the answer of a server that is no MDS,
// and says why: a gRPC server without the MDS's services (a chunkserver),
// an HTTP/1.1 server (a metrics listener), or one that does not speak
// HTTP/2 at all (an NBD or iSCSI port). A TLS listener hanging up on a
// plaintext client is not one of them (closedBeforePreface).
func notAnMDS(err error) (string, bool) {
	st := status.Convert(err)
	msg := st.Message()
	switch {
	case st.Code() == codes.Unimplemented && strings.Contains(msg, "unknown service"):
		return msg, true
	case st.Code() != codes.Unavailable:
		return "", false
	case strings.Contains(msg, "looked like an HTTP/1.1 header"):
		return msg, true
	case strings.Contains(msg, "error reading server preface") && !closedBeforePreface(err):
		return msg, true
	}
	return "", false
}

func all(addrs []string, in map[string]bool) bool {
	for _, a := range addrs {
		if !in[a] {
			return false
		}
	}
	return true
}

// closedBeforePreface reports whether err is gRPC's report of a server
// that closed a plaintext connection before speaking HTTP/2 (what a TLS
// listener does with a plaintext client).
func closedBeforePreface(err error) bool {
	msg := status.Convert(err).Message()
	// A server that closes while the client's preface is still unread in
	// its socket resets the connection instead of ending it.
	return strings.Contains(msg, "error reading server preface: EOF") ||
		strings.Contains(msg, "error reading server preface:") && strings.Contains(msg, "connection reset by peer")
}

// NewStream opens a stream on the current leader. Streams are not retried.
func (c *Conn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	cc, err := c.conn(c.Leader())
	if err != nil {
		return nil, err
	}
	return cc.NewStream(ctx, desc, method, opts...)
}

// NotLeaderAddress reports whether err carries a mdspb.NotLeader detail and
// returns the leader address it names ("" while an election runs).
func NotLeaderAddress(err error) (string, bool) {
	st, ok := status.FromError(err)
	if !ok {
		return "", false
	}
	for _, d := range st.Details() {
		if nl, ok := d.(*mdspb.NotLeader); ok {
			return nl.GetLeaderAddress(), true
		}
	}
	return "", false
}

// NotLeaderError builds the error an MDS that does not lead returns: an
// UNAVAILABLE status with a mdspb.NotLeader detail naming leader.
func NotLeaderError(leader string) error {
	msg := "mds: not the leader"
	if leader != "" {
		msg += "; leader is " + leader
	} else {
		msg += "; no leader elected yet"
	}
	st, err := status.New(codes.Unavailable, msg).WithDetails(&mdspb.NotLeader{LeaderAddress: leader})
	if err != nil {
		return status.Error(codes.Unavailable, msg)
	}
	return st.Err()
}

// Volumes returns the volume service client over c.
func (c *Conn) Volumes() mdspb.VolumeServiceClient { return mdspb.NewVolumeServiceClient(c) }

// Topology returns the topology service client over c.
func (c *Conn) Topology() mdspb.TopologyServiceClient { return mdspb.NewTopologyServiceClient(c) }

// Heartbeats returns the heartbeat service client over c.
func (c *Conn) Heartbeats() mdspb.HeartbeatServiceClient { return mdspb.NewHeartbeatServiceClient(c) }

// Cluster returns the cluster service client over c.
func (c *Conn) Cluster() mdspb.ClusterServiceClient { return mdspb.NewClusterServiceClient(c) }

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
