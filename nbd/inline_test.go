package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
)

// idle waits until no request of the server is in flight (their limiter
// slots are given back before the count drops).
func idle(t *testing.T, env *testEnv) {
	t.Helper()
	soon.True(t, 10*time.Second, "no request in flight", func() bool { return env.srv.Stats().InFlight == 0 })
}

// TestLoneReadsRunOnTheReader: reads that arrive one at a time run on the
// goroutine that read them, and are answered as usual; writes, and requests
// that arrive together, run on workers.
func TestLoneReadsRunOnTheReader(t *testing.T) {
	env := newTestEnv(t, func(c *Config) { c.InlineFor = time.Minute })
	env.createExport("vol", testSize, nil)
	c := connect(t, env.addr, "vol", false)
	data := pattern(4096, 7)
	if r := c.do(0, cmdWrite, 4096, 4096, data); r.errno != 0 {
		t.Fatalf("write: %s", errnoName(r.errno))
	}
	for range 10 {
		idle(t, env) // the previous request gave its slot back: the next one is alone
		if r := c.do(0, cmdRead, 4096, 4096, nil); r.errno != 0 || !bytes.Equal(r.data, data) {
			t.Fatalf("read: %s", errnoName(r.errno))
		}
	}
	if n := env.srv.Stats().InlineTotal; n != 10 {
		t.Fatalf("%d requests ran on the reader, want the 10 lone reads", n)
	}

	// Requests that arrive together run side by side on workers.
	idle(t, env)
	before := env.srv.Stats().InlineTotal
	var reqs []byte
	for i := range 8 {
		reqs = append(reqs, encodeRequest(0, cmdRead, uint64(100+i), uint64(i)*4096, 4096)...)
	}
	c.mu.Lock()
	for i := range 8 {
		c.pending[uint64(100+i)] = request{typ: cmdRead, cookie: uint64(100 + i), offset: uint64(i) * 4096, length: 4096}
	}
	c.mu.Unlock()
	c.write(reqs)
	for range 8 {
		if r, err := c.recv(); err != nil || r.errno != 0 {
			t.Fatalf("read: %v", err)
		}
	}
	if n := env.srv.Stats().InlineTotal - before; n > 1 {
		t.Fatalf("%d of 8 requests sent together ran on the reader, want at most one (the last, once the others are done)", n)
	}
}

// TestSlowLoneRequestDoesNotHoldTheConnection: a request that runs on the
// reader and takes long (held in the backend) passes the reading on, so
// that a request sent after it is read and answered meanwhile.
func TestSlowLoneRequestDoesNotHoldTheConnection(t *testing.T) {
	env, _, hold := exportWithHold(t, blockdevtest.OpRead)
	c := connect(t, env.addr, "vol", false)
	slow := c.send(0, cmdRead, 0, 4096, nil)
	<-hold.Entered()
	if env.srv.Stats().InlineTotal != 1 {
		t.Fatal("the lone request did not run on the reader: the test needs it to")
	}
	_ = c.nc.SetReadDeadline(time.Now().Add(20 * time.Second))
	fast := c.send(0, cmdRead, 8192, 4096, nil)
	r, err := c.recv()
	if err != nil || r.cookie != fast {
		t.Fatalf("the request sent behind a held one: %v (reply %+v), want its answer while the other is held", err, r)
	}
	hold.Release()
	if r, err := c.recv(); err != nil || r.cookie != slow || r.errno != 0 {
		t.Fatalf("the held request: %v %+v", err, r)
	}
}

// TestReadingPassesWithinTheWorkerBound: with one request allowed in flight,
// a held inline read passes the reading to a second goroutine, which waits
// for the slot; the connection never has more than MaxInFlight+1 workers,
// and the request behind the held one runs once it returns.
func TestReadingPassesWithinTheWorkerBound(t *testing.T) {
	env, _, hold := exportWithHold(t, blockdevtest.OpRead, func(c *Config) { c.MaxInFlight = 1 })
	c := connect(t, env.addr, "vol", false)
	var peak atomic.Int32
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			peak.Store(max(peak.Load(), workersOf(env.srv)))
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Microsecond):
			}
		}
	}()
	slow := c.send(0, cmdRead, 0, 4096, nil)
	<-hold.Entered()
	next := c.send(0, cmdRead, 8192, 4096, nil)
	// The reading passes on; the second read waits for the slot.
	soon.Succeeds(t, 10*time.Second, func() error {
		if n := workersOf(env.srv); n < 2 {
			return fmt.Errorf("%d workers, want the reading passed to a second one", n)
		}
		return nil
	})
	hold.Release()
	got := map[uint64]bool{}
	for range 2 {
		r, err := c.recv()
		if err != nil || r.errno != 0 {
			t.Fatalf("reply: %v %+v", err, r)
		}
		got[r.cookie] = true
	}
	if !got[slow] || !got[next] {
		t.Fatalf("answers %v, want both reads", got)
	}
	close(stop)
	<-sampled
	if p := max(peak.Load(), workersOf(env.srv)); p > 2 {
		t.Fatalf("%d workers at once, want at most MaxInFlight+1 = 2", p)
	}
}

// workersOf is the most workers any connection of srv has started.
func workersOf(srv *Server) int32 {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	var n int32
	for o := range srv.mu.conns {
		n = max(n, o.workers.Load())
	}
	return n
}

// TestDeadClientsWriteBehindAnInlineReadDoesNotOvertake: a client's write
// pipelined behind a lone read that runs on the reader (held in the backend,
// and InlineFor long, so nothing reads the socket) is still unread when the
// client dies and its next connection writes the same block. The new
// connection finds the old one's client gone and kills it: the older write
// never runs after the newer one.
func TestDeadClientsWriteBehindAnInlineReadDoesNotOvertake(t *testing.T) {
	env, dev, hold := exportWithHold(t, blockdevtest.OpRead, func(c *Config) { c.InlineFor = time.Minute })
	a, b := bytes.Repeat([]byte{0xaa}, 4096), bytes.Repeat([]byte{0xbb}, 4096)

	old := connect(t, env.addr, "vol", false)
	old.send(0, cmdRead, 0, 4096, nil)
	<-hold.Entered()
	if env.srv.Stats().InlineTotal != 1 {
		t.Fatal("the lone read did not run on the reader: the test needs it to")
	}
	old.send(0, cmdWrite, 8192, 4096, a) // the client's older write, unread
	old.nc.Close()                       // the client dies

	c := connect(t, env.addr, "vol", false)
	w := c.send(0, cmdWrite, 8192, 4096, b)
	soon.True(t, 10*time.Second, "the old connection's read cancelled", hold.Cancelled)
	hold.Release()
	newerWriteWins(t, env, dev, c, w, b)
}

// TestBugAfterTheReadingPassedEndsTheConnection: a request run inline that
// fails on a bug (here the OnRequest hook panics) after the reading passed
// to another goroutine ends the connection through that goroutine: the
// connection closes, its export handle is closed once, and the server goes
// on serving.
func TestBugAfterTheReadingPassedEndsTheConnection(t *testing.T) {
	var armed atomic.Bool
	env, _, hold := exportWithHold(t, blockdevtest.OpRead, func(c *Config) {
		c.OnRequest = func(ev RequestEvent) {
			if ev.Command == "read" && ev.Offset == 0 && armed.CompareAndSwap(true, false) {
				panic("hook bug")
			}
		}
	})
	c := connect(t, env.addr, "vol", false)
	c.send(0, cmdRead, 0, 4096, nil)
	<-hold.Entered()
	// The reading passed on: a read sent now is answered while the first is held.
	fast := c.send(0, cmdRead, 8192, 4096, nil)
	if r, err := c.recv(); err != nil || r.cookie != fast {
		t.Fatalf("read behind the held one: %v %+v", err, r)
	}
	armed.Store(true)
	hold.Release()
	_ = c.nc.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.recv(); err != nil {
		t.Fatalf("the held read's answer: %v", err)
	}
	var ne net.Error
	if _, err := c.recv(); err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the connection stayed open after its reader failed on a bug (%v)", err)
	}
	soon.True(t, 10*time.Second, "the connection ended", func() bool {
		st := env.srv.Stats()
		return st.Connections == 0 && st.InFlight == 0 && env.exports.Live("vol") == 0
	})
	c2 := connect(t, env.addr, "vol", false)
	if r := c2.do(0, cmdRead, 0, 4096, nil); r.errno != 0 {
		t.Fatalf("read on a new connection: %s", errnoName(r.errno))
	}
}

// TestInlineOff: with a negative InlineFor every request runs on a worker.
func TestInlineOff(t *testing.T) {
	env := newTestEnv(t, func(c *Config) { c.InlineFor = -1 })
	env.createExport("vol", testSize, nil)
	c := connect(t, env.addr, "vol", false)
	for range 3 {
		idle(t, env)
		if r := c.do(0, cmdRead, 0, 4096, nil); r.errno != 0 {
			t.Fatalf("read: %s", errnoName(r.errno))
		}
	}
	if n := env.srv.Stats().InlineTotal; n != 0 {
		t.Fatalf("%d requests ran on the reader with InlineFor off", n)
	}
}

// TestReadingPassedOnOftenStaysWithOneReader: with InlineFor tiny and a
// slow device, lone reads pass the reading to another goroutine while they
// run, again and again. Reads and bursts still get their own answers, and
// the race detector (CI runs the tests with it) sees the readers ordered.
func TestReadingPassedOnOftenStaysWithOneReader(t *testing.T) {
	env := newTestEnv(t, func(c *Config) { c.InlineFor = time.Nanosecond })
	env.createExport("vol", testSize, nil)
	env.device("vol").SetLatency(100 * time.Microsecond) // long enough for the timer to fire
	c := connect(t, env.addr, "vol", false)
	blocks := map[uint64][]byte{}
	for i := range 16 {
		off := uint64(i) * 4096
		blocks[off] = pattern(4096, byte(i+1))
		if r := c.do(0, cmdWrite, off, 4096, blocks[off]); r.errno != 0 {
			t.Fatalf("write: %s", errnoName(r.errno))
		}
	}
	for i := range 400 {
		off := uint64(i*7%16) * 4096
		if i%10 == 9 { // a burst: the reading may pass while the first runs inline
			var reqs []byte
			c.mu.Lock()
			for j := range 4 {
				o := uint64((i+j)%16) * 4096
				cookie := uint64(100000 + i*4 + j)
				c.pending[cookie] = request{typ: cmdRead, cookie: cookie, offset: o, length: 4096}
				reqs = append(reqs, encodeRequest(0, cmdRead, cookie, o, 4096)...)
			}
			c.mu.Unlock()
			c.write(reqs)
			for range 4 {
				if r, err := c.recv(); err != nil || r.errno != 0 {
					t.Fatalf("burst read: %v", err)
				}
			}
			continue
		}
		if r := c.do(0, cmdRead, off, 4096, nil); r.errno != 0 || !bytes.Equal(r.data, blocks[off]) {
			t.Fatalf("read %d at %d: %s, or not the block written", i, off, errnoName(r.errno))
		}
	}
	if env.srv.Stats().InlineTotal == 0 || workersOf(env.srv) < 2 {
		t.Fatal("no read ran on the reader, or none passed the reading on: the test needs them to")
	}
}
