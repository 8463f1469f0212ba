package wire

import (
	"context"

	"google.golang.org/protobuf/proto"
)

// Requests run on worker goroutines that stay for the next request.
//
// A goroutine started for each request begins with a small stack, and a
// handler that goes deep (a chunk write runs its copyset's Raft round on
// it) grows that stack by copying it, once per request: ~4% of a
// chunkserver's CPU under 4 KiB random writes. A worker keeps its grown
// stack from one request to the next (until a garbage collection finds it
// idle and halves it). At most maxIdleWorkers wait idle per
// connection; a worker that finishes while that many wait exits, so a burst
// of requests leaves no more goroutines behind than that.

// maxIdleWorkers bounds the idle workers of a connection.
const maxIdleWorkers = 32

// job is a decoded request on its way to a worker.
type job struct {
	ctx    context.Context
	cancel context.CancelFunc
	h      header
	md     *method
	req    proto.Message
}

// dispatch hands j to an idle worker, or starts one. The caller holds one
// of sc.slots for j, so at most MaxConcurrent workers run handlers.
func (sc *serverConn) dispatch(j job) {
	select {
	case sc.work <- j:
		return
	default:
	}
	sc.running.Add(1)
	sc.workers.Add(1)
	go sc.worker(j)
}

// worker runs j, then the jobs handed to it, until the connection ends or
// enough workers are idle.
func (sc *serverConn) worker(j job) {
	defer sc.running.Done()
	defer sc.workers.Add(-1)
	for {
		sc.run(j)
		if sc.idle.Add(1) > maxIdleWorkers {
			sc.idle.Add(-1)
			return
		}
		select {
		case j = <-sc.work:
			sc.idle.Add(-1)
		case <-sc.done:
			sc.idle.Add(-1)
			return
		}
	}
}

// run calls j's handler, answers and gives back j's slot.
func (sc *serverConn) run(j job) {
	resp, err := j.md.handler(j.ctx, j.req)
	sc.mu.Lock()
	delete(sc.cancels, j.h.id)
	sc.mu.Unlock()
	j.cancel()
	sc.answer(j.h, resp, err)
	<-sc.slots
}
