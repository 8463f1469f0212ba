package wire

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"
)

// ClientOptions configure a Client.
type ClientOptions struct {
	// MaxFrame bounds a received frame's payload (default DefaultMaxFrame).
	MaxFrame int
	// MaxPending bounds the request bytes waiting to be written (default
	// 4 MiB); callers wait beyond it.
	MaxPending int
	// WriteTimeout bounds one write (default 30s); a server that does not
	// read for that long is disconnected.
	WriteTimeout time.Duration
	// Dialer dials the server (default: a net.Dialer with a 5s timeout).
	Dialer func(ctx context.Context, addr string) (net.Conn, error)
}

func (o *ClientOptions) setDefaults() {
	if o.MaxFrame <= 0 {
		o.MaxFrame = DefaultMaxFrame
	}
	if o.MaxPending <= 0 {
		o.MaxPending = 4 << 20
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = 30 * time.Second
	}
	if o.Dialer == nil {
		d := &net.Dialer{Timeout: 5 * time.Second}
		o.Dialer = func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		}
	}
}

// call is a request waiting for its answer.
type call struct {
	resp proto.Message
	done chan error // buffered; receives the outcome once
}

// Client is one connection to a wire server, shared by any number of
// concurrent calls. A Client that lost its connection stays broken (Err
// says why); make a new one, or use a Pool, which does.
type Client struct {
	addr string
	opts ClientOptions
	conn net.Conn
	w    *writer
	bufs bufferPool
	ids  atomic.Uint64
	done chan struct{}

	mu      sync.Mutex
	pending map[uint64]*call
	err     error // why the connection ended; set before done closes
}

// Dial connects to addr and exchanges prefaces.
func Dial(ctx context.Context, addr string, opts ClientOptions) (*Client, error) {
	opts.setDefaults()
	conn, err := opts.Dialer(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("wire: dial %s: %w", addr, err)
	}
	c := &Client{addr: addr, opts: opts, conn: conn, done: make(chan struct{}), pending: map[uint64]*call{}}
	c.w = newWriter(conn, opts.MaxPending, opts.WriteTimeout)
	if err := c.w.sendPreface(); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("wire: %s: %w", addr, err)
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetReadDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	err = readPreface(r)
	stop()
	_ = conn.SetReadDeadline(time.Time{})
	if err != nil {
		_ = conn.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("wire: %s does not speak the wire protocol: %w", addr, err)
	}
	go c.readLoop(r)
	return c, nil
}

// Addr is the server's address.
func (c *Client) Addr() string { return c.addr }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended, nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close closes the connection; pending calls fail with ErrClosed.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	return nil
}

// fail ends the connection with err (the first cause wins) and fails every
// pending call.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if !errors.Is(err, ErrClosed) {
		err = fmt.Errorf("%w: %s: %w", ErrClosed, c.addr, err)
	}
	c.err = err
	pending := c.pending
	c.pending = nil
	close(c.done)
	c.mu.Unlock()
	c.w.fail(err)
	_ = c.conn.Close()
	for _, cl := range pending {
		cl.done <- err
	}
}

// Call sends req as method m and decodes the answer into resp. The
// context's deadline travels with the request; when the context ends first,
// Call tells the server and returns the context's error.
func (c *Client) Call(ctx context.Context, m Method, req, resp proto.Message) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	id := c.ids.Add(1)
	cl := &call{resp: resp, done: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.pending[id] = cl
	c.mu.Unlock()
	h := header{kind: kindRequest, method: m, id: id}
	if dl, ok := ctx.Deadline(); ok {
		h.timeout = max(time.Until(dl), time.Microsecond)
	}
	if err := c.w.send(ctx, h, req, ""); err != nil {
		c.forget(id)
		if !connectionFailed(err) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		c.fail(err)
		return c.Err()
	}
	select {
	case err := <-cl.done:
		return answered(ctx, err)
	case <-ctx.Done():
		if c.forget(id) {
			// Tell the server without waiting (a connection that takes
			// no bytes must not hold the caller past its context), but
			// ahead of every request sent after this call returns.
			c.w.post(header{kind: kindCancel, method: m, id: id})
			return ctx.Err()
		}
		return answered(ctx, <-cl.done) // the answer raced the context
	}
}

// answered is what Call returns for the answer err to a call made with ctx:
// a failure that comes once the call's context has ended is the context's.
// The server gives up at the same deadline, so its answer may arrive before
// the context's timer fires, or race it.
func answered(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// forget removes a pending call; false if it was already answered.
func (c *Client) forget(id uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.pending[id]; !ok {
		return false
	}
	delete(c.pending, id)
	return true
}

// Send sends msg as a one-way message of method m.
func (c *Client) Send(m Method, msg proto.Message) error {
	return c.SendContext(context.Background(), m, msg)
}

// SendContext is Send bounded by ctx: when ctx ends while the message waits
// for room it is not sent; when it ends while this caller writes, the write
// is cut short and the connection fails.
func (c *Client) SendContext(ctx context.Context, m Method, msg proto.Message) error {
	if err := c.w.send(ctx, header{kind: kindMessage, method: m}, msg, ""); err != nil {
		if !connectionFailed(err) {
			return err
		}
		c.fail(err)
		return c.Err()
	}
	return nil
}

func (c *Client) readLoop(r *bufio.Reader) {
	hdr := make([]byte, HeaderSize)
	for {
		h, payload, err := readFrame(r, hdr, c.opts.MaxFrame, &c.bufs)
		if err != nil {
			c.fail(err)
			return
		}
		if h.kind != kindResponse && h.kind != kindError {
			c.bufs.put(payload)
			c.fail(fmt.Errorf("%w: the server sent a %s frame", ErrProtocol, h.kind))
			return
		}
		c.mu.Lock()
		cl := c.pending[h.id]
		delete(c.pending, h.id)
		c.mu.Unlock()
		if cl == nil { // cancelled by the caller
			c.bufs.put(payload)
			continue
		}
		if h.kind == kindError {
			err = &RemoteError{Method: h.method, Msg: string(payload)}
		} else if err = proto.Unmarshal(payload, cl.resp); err != nil {
			err = fmt.Errorf("wire: decode response of method %d from %s: %w", h.method, c.addr, err)
		}
		c.bufs.put(payload)
		cl.done <- err
	}
}
