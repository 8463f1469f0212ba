package faultfs

import (
	"context"
	"fmt"
	"math"
	"sync"
)

// CrashOptions choose what a crash keeps.
type CrashOptions struct {
	// Keep is the probability (0..1) that each unsynced page, and a changed
	// file size, survives. 0 (the default) loses all unsynced data; between
	// 0 and 1 models partial writeback: every page is either all old or all
	// new, so a write across pages may be torn.
	Keep float64
	// Seed decides which pages survive when Keep > 0: the decision for a
	// page depends only on Seed, the file's path when it was first changed
	// after its last sync and the page's index.
	Seed uint64
}

func (o CrashOptions) validate() error {
	if math.IsNaN(o.Keep) || o.Keep < 0 || o.Keep > 1 {
		return fmt.Errorf("faultfs: crash: Keep %v is not within 0..1", o.Keep)
	}
	return nil
}

// CrashReport says what a crash did.
type CrashReport struct {
	Files     int // files that had unsynced changes
	PagesLost int // pages put back to their content at the last sync
	PagesKept int // unsynced pages kept (CrashOptions.Keep > 0)
}

// crashState lets callers wait for a crash that a request set off
// (CrashAtSync) and lets Restart wait until it is done.
type crashState struct {
	mu      sync.Mutex
	done    chan struct{} // closed when a crash completes; renewed by Restart
	pending chan struct{} // while a cut set off by a request is restoring
	report  CrashReport
	err     error
}

// Crash cuts the power: it waits for the requests in flight, then puts
// every file with unsynced changes back to what a disk would hold after a
// power loss (see CrashOptions), and fails every later request through the
// mount with EIO until Restart. Files open before the crash stay unusable
// after Restart. Kill the processes that use the mount first. An error
// means a backing file could not be restored (its state is then unknown).
func (f *FS) Crash(opts CrashOptions) (CrashReport, error) {
	if err := opts.validate(); err != nil {
		return CrashReport{}, err
	}
	f.gate.Lock()
	defer f.gate.Unlock()
	return f.crashLocked(opts)
}

// crashLocked crashes with the gate held exclusively.
func (f *FS) crashLocked(opts CrashOptions) (CrashReport, error) {
	f.crashed.Store(true)
	f.epoch.Add(1)
	rep, err := f.tr.crash(opts.Keep, opts.Seed)
	f.stats.crashes.Add(1)
	f.stats.pagesLost.Add(uint64(rep.PagesLost))
	f.stats.pagesKept.Add(uint64(rep.PagesKept))
	if err != nil {
		f.log.Error("faultfs: crash could not restore every file", "err", err)
	}
	c := &f.crash
	c.mu.Lock()
	c.report, c.err = rep, err
	if c.done == nil {
		c.done = make(chan struct{})
	}
	select {
	case <-c.done:
	default:
		close(c.done)
	}
	c.mu.Unlock()
	return rep, err
}

// cutPower crashes from inside a request (which holds the gate shared):
// every request from now on fails, and the restore runs as soon as the
// requests in flight, the caller's included, have finished.
func (f *FS) cutPower(opts CrashOptions) {
	c := &f.crash
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.crashed.Swap(true) {
		return
	}
	pending := make(chan struct{})
	c.pending = pending
	go func() {
		defer close(pending)
		f.gate.Lock()
		defer f.gate.Unlock()
		_, _ = f.crashLocked(opts)
	}()
}

// WaitCrash waits until the filesystem has crashed (by Crash or a
// CrashAtSync rule) since the last Restart, or ctx ends, and returns that
// crash's report and error.
func (f *FS) WaitCrash(ctx context.Context) (CrashReport, error) {
	c := &f.crash
	c.mu.Lock()
	if c.done == nil {
		c.done = make(chan struct{})
	}
	done := c.done
	c.mu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
		return CrashReport{}, ctx.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.report, c.err
}

// Restart powers the filesystem back on after a crash: requests work again
// (files opened before the crash keep failing). A crash set off by a
// CrashAtSync rule is completed first. Restart does nothing when the
// filesystem is not crashed, and nothing after Unmount.
func (f *FS) Restart() {
	c := &f.crash
	c.mu.Lock()
	pending := c.pending
	c.mu.Unlock()
	if pending != nil {
		<-pending
	}
	f.gate.Lock()
	defer f.gate.Unlock()
	if !f.crashed.Load() {
		return
	}
	f.crashed.Store(f.unmounted)
	c.mu.Lock()
	c.done, c.pending = make(chan struct{}), nil
	c.mu.Unlock()
}
