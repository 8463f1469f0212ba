package nbd

import (
	"fmt"
	"runtime/debug"
)

// Reads run on the goroutine that read them.
//
// A connection's requests are read by one goroutine at a time and normally run on worker
// goroutines (dispatch), so that the reading goes on while they wait for the backend. For a
// short request that arrived alone, the hand-off is much of what the server costs: waking a
// worker, and often a thread to run it, took ~8% of a 4 KiB read's time and ~7% of its CPU at
// queue depth 1 through a Cairn volume (docs/bench.md). So a READ that arrives while no other request of the
// connection is in flight, and with no other buffered behind it, runs on the goroutine that
// read it. (Writes take several times as long as reads, which makes the hand-off matter less
// and the wait of a request behind them more: they always run on workers.)
//
// While it runs, nothing reads the connection. So that a request arriving meanwhile does not
// wait long for it (a volume whose copyset is electing a leader, a busy disk), the reading
// passes to a worker once the read has run for Config.InlineFor: a timer hands the reading
// to an idle worker, or starts one. The goroutine whose request ran long finishes it and then
// serves as a worker. Exactly one goroutine reads at any time: the timer's Stop tells the
// goroutine of the request whether the reading is still its own. (The reading always runs on
// workers: the connection's own goroutine waits for its end, free to cancel the requests in
// flight when the client went away.)

// readRequests reads requests on the calling goroutine until the reading ends, and sends why
// on c.readEnd; or until it passes the reading to another goroutine.
func (c *serverConn) readRequests() {
	// The reading is held (c.reading) by the goroutine that reads; runInline lets it go while a
	// request runs, for the timer to pass it on. The lock also orders what one reader did before
	// the next one reads: the timer's goroutine alone would not show it to the race detector.
	c.reading.Lock()
	var inline bool // a request runs inline: the reading is let go, the timer may pass it on
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		c.log.Error("nbd: request reader failed on a bug; connection will close", "panic", r, "stack", string(debug.Stack()))
		err := fmt.Errorf("nbd: request reader failed on a bug: %v", r)
		if !inline {
			c.reading.Unlock()
			c.readEnd <- err // the reading is this goroutine's: it ends here
			return
		}
		if c.pass.Stop() {
			c.readEnd <- err // the reading was not passed on: it ends here
			return
		}
		// The reading passed to another goroutine while the request ran here: end it there.
		// Only the goroutine that reads may send on readEnd, once.
		c.kill(err.Error())
	}()
	if err := c.readLoop(&inline); err != nil {
		c.reading.Unlock()
		c.readEnd <- err
	}
	// Else the reading passed to another goroutine while a request ran inline.
}

// runsInline tells whether op, just read, runs on the reading goroutine: a READ holding the
// limiter's only slot, with nothing buffered behind it. Reading goroutine only.
func (c *serverConn) runsInline(op *operation) bool {
	return op.req.typ == cmdRead && c.srv.cfg.InlineFor > 0 && c.r.Buffered() == 0 && c.lim.alone()
}

// runInline runs op on the reading goroutine, the timer set to pass the reading on if it
// runs for longer than InlineFor. It reports whether the reading passed to another goroutine;
// if not, the reading is held again. *inline is true while the reading is let go
// (readRequests' recover needs to know).
func (c *serverConn) runInline(op *operation, inline *bool) (passed bool) {
	c.srv.stats.inline.Add(1)
	*inline = true
	c.reading.Unlock()
	c.pass.Reset(c.srv.cfg.InlineFor)
	c.run(op)
	if !c.pass.Stop() {
		return true
	}
	c.reading.Lock()
	*inline = false
	return false
}

// passReading hands the reading of requests to an idle worker, or to a new one while fewer than
// maxWorkers exist (else it waits for one to be idle: the limiter guarantees that one will
// be). It runs on the timer's goroutine, for the reading goroutine, which is busy with a request
// meanwhile.
func (c *serverConn) passReading() {
	select {
	case c.role <- struct{}{}:
		return
	default:
	}
	if c.workers.Load() < c.maxWorkers() {
		c.workers.Add(1)
		go c.worker(nil)
		return
	}
	select {
	case c.role <- struct{}{}:
	case <-c.done:
	}
}
