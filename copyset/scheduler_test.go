package copyset

import (
	"runtime"
	"sync"
	"testing"
)

func TestSchedFlagsQueueOnceAndRequeueWorkArrivingWhileRunning(t *testing.T) {
	var s schedFlags
	if !s.signal() {
		t.Fatal("first signal of an idle copyset must ask to queue it")
	}
	if s.signal() {
		t.Fatal("a queued copyset must not be queued twice")
	}
	s.begin()
	if s.end() {
		t.Fatal("no work arrived while running: nothing to requeue")
	}
	if !s.signal() {
		t.Fatal("an idle copyset must be queued again")
	}
	s.begin()
	if s.signal() {
		t.Fatal("work arriving while running must not queue a second runner")
	}
	if !s.end() {
		t.Fatal("work that arrived while running must requeue the copyset")
	}
	if s.signal() {
		t.Fatal("the requeued copyset counts as queued")
	}
}

func TestWorkQueueFIFOAndClose(t *testing.T) {
	q := newWorkQueue()
	a, b := &Copyset{id: 1}, &Copyset{id: 2}
	q.push(a)
	q.push(b)
	if c, ok := q.pop(); !ok || c != a {
		t.Fatalf("pop = %v, %v; want the first pushed", c, ok)
	}
	if c, ok := q.pop(); !ok || c != b {
		t.Fatalf("pop = %v, %v; want the second pushed", c, ok)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if c, ok := q.pop(); ok {
			t.Errorf("pop after close returned %v", c)
		}
	}()
	q.close()
	wg.Wait()
}

func TestWorkQueueOneRunnerPerCopysetUnderConcurrency(t *testing.T) {
	// Many producers signal one copyset while workers run it: the flags
	// must never let two workers run it at once and never lose a signal.
	q := newWorkQueue()
	c := &Copyset{id: 7}
	var mu sync.Mutex
	var running, maxRunning, runs int
	signals := 0
	signal := func() {
		mu.Lock()
		signals++
		push := c.sched.signal()
		mu.Unlock()
		if push {
			q.push(c)
		}
	}
	var workers sync.WaitGroup
	for range 4 {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for {
				got, ok := q.pop()
				if !ok {
					return
				}
				mu.Lock()
				got.sched.begin()
				running++
				maxRunning = max(maxRunning, running)
				runs++
				mu.Unlock()
				mu.Lock()
				running--
				again := got.sched.end()
				mu.Unlock()
				if again {
					q.push(got)
				}
			}
		}()
	}
	var producers sync.WaitGroup
	for range 8 {
		producers.Add(1)
		go func() {
			defer producers.Done()
			for range 500 {
				signal()
			}
		}()
	}
	producers.Wait()
	// Wait until the copyset is idle: neither queued nor running.
	for {
		mu.Lock()
		idle := !c.sched.queued && !c.sched.running
		mu.Unlock()
		if idle {
			break
		}
		runtime.Gosched()
	}
	q.close()
	workers.Wait()
	if maxRunning != 1 {
		t.Fatalf("%d workers ran the copyset at once", maxRunning)
	}
	if runs == 0 || runs > signals {
		t.Fatalf("%d runs for %d signals", runs, signals)
	}
}
