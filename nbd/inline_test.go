package nbd

import (
	"bytes"
	"testing"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
)

// TestLoneReadsRunOnTheReader: reads that arrive one at a time run on the
// goroutine that read them, and are answered as usual; writes, and requests
// that arrive together, run on workers.
func TestLoneReadsRunOnTheReader(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	c := connect(t, env.addr, "vol", false)
	data := pattern(4096, 7)
	if r := c.do(0, cmdWrite, 4096, 4096, data); r.errno != 0 {
		t.Fatalf("write: %s", errnoName(r.errno))
	}
	for range 10 {
		if r := c.do(0, cmdRead, 4096, 4096, nil); r.errno != 0 || !bytes.Equal(r.data, data) {
			t.Fatalf("read: %s", errnoName(r.errno))
		}
	}
	if n := env.srv.Stats().InlineTotal; n != 10 {
		t.Fatalf("%d requests ran on the reader, want the 10 lone reads", n)
	}

	// Requests that arrive together run side by side on workers.
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
		t.Fatalf("%d of 8 requests sent together ran on the reader, want at most the first", n)
	}
}

// TestSlowLoneRequestDoesNotHoldTheConnection: a request that runs on the
// reader and takes long (held in the backend) passes the reading on, so
// that a request sent after it is read and answered meanwhile.
func TestSlowLoneRequestDoesNotHoldTheConnection(t *testing.T) {
	env := newTestEnv(t)
	env.createExport("vol", testSize, nil)
	hold := env.device("vol").HoldAt(blockdevtest.OpRead, 0)
	t.Cleanup(hold.Release)
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

// TestInlineOff: with a negative InlineFor every request runs on a worker.
func TestInlineOff(t *testing.T) {
	env := newTestEnv(t, func(c *Config) { c.InlineFor = -1 })
	env.createExport("vol", testSize, nil)
	c := connect(t, env.addr, "vol", false)
	for range 3 {
		if r := c.do(0, cmdRead, 0, 4096, nil); r.errno != 0 {
			t.Fatalf("read: %s", errnoName(r.errno))
		}
	}
	if n := env.srv.Stats().InlineTotal; n != 0 {
		t.Fatalf("%d requests ran on the reader with InlineFor off", n)
	}
}
