package chunkfilepool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

type jobKind int

const (
	jobNone   jobKind = iota
	jobZero           // zero a dirty file
	jobRedo           // format a file found in formatting/ again
	jobFormat         // create and format a new file
)

// run is the background worker: it zeroes dirty files first (they cost no
// disk space), then redoes interrupted formats, then grows the pool.
func (p *Pool) run() {
	defer close(p.done)
	for p.ctx.Err() == nil {
		kind, name := p.nextJob()
		switch kind {
		case jobZero:
			p.zeroDirty(name)
		case jobRedo:
			p.redo(name)
		case jobFormat:
			p.formatNew()
		default:
			select {
			case <-p.wake:
			case <-p.ctx.Done():
			}
		}
	}
}

// nextJob picks the worker's next job and marks it under way.
func (p *Pool) nextJob() (jobKind, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mu.closed {
		return jobNone, ""
	}
	if len(p.mu.dirty) > 0 {
		name := p.mu.dirty[0]
		p.mu.dirty = p.mu.dirty[1:]
		p.mu.zeroing = name
		return jobZero, name
	}
	if p.mu.limit != "" {
		// Growth stopped (disk full, format error); a Get that finds the
		// pool empty checks again and lifts the limit when space is back.
		return jobNone, ""
	}
	if len(p.mu.partial) > 0 {
		name := p.mu.partial[0]
		p.mu.partial = p.mu.partial[1:]
		p.mu.formatting, p.mu.fmtDone = name, 0
		return jobRedo, name
	}
	maxFiles := p.opts.MaxChunks
	spare := len(p.mu.clean) + len(p.mu.dirty)
	want := max(p.opts.LowWater, p.demandLocked(time.Now())) + p.mu.waiters
	if p.mu.target <= p.mu.owned && spare < want && (maxFiles == 0 || p.mu.owned < maxFiles) {
		t := p.mu.owned + max(p.opts.GrowBy, want-spare)
		if maxFiles > 0 {
			t = min(t, maxFiles)
		}
		p.log.Info("chunk file pool growing", "clean", len(p.mu.clean), "owned", p.mu.owned, "target", t)
		p.mu.target = t
	}
	if p.mu.owned >= p.mu.target || (maxFiles > 0 && p.mu.owned >= maxFiles) {
		return jobNone, ""
	}
	if reason := p.spaceShortage(); reason != "" {
		p.stopGrowingLocked(reason)
		return jobNone, ""
	}
	return jobFormat, ""
}

// stopGrowingLocked records why the pool cannot grow and wakes waiting Gets
// so that they fail instead of waiting for a file that will not come.
func (p *Pool) stopGrowingLocked(reason string) {
	p.log.Warn("chunk file pool stops growing", "reason", reason, "owned", p.mu.owned, "clean", len(p.mu.clean))
	p.mu.limit = reason
	p.mu.target = p.mu.owned
	p.broadcastLocked()
}

// formatNew creates the next file in formatting/, records it as owned and
// formats it. The file is named owned+1 and the count is recorded after the
// create, so that Open can tell a file created just before a crash (its name
// is above the recorded count) and count it.
func (p *Pool) formatNew() {
	p.mu.Lock()
	n := p.mu.owned + 1
	p.mu.Unlock()
	name := strconv.Itoa(n)
	path := filepath.Join(p.fmtDir, name)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err == nil {
		err = fsutil.SyncDir(p.fmtDir)
		if err == nil {
			err = p.writeState(n)
		}
		if err != nil {
			_ = f.Close()
			_ = os.Remove(path)
		}
	}
	if err != nil {
		p.mu.Lock()
		p.stopGrowingLocked(fmt.Sprintf("create pool file: %v", err))
		p.mu.Unlock()
		return
	}
	p.mu.Lock()
	p.mu.owned = n
	p.mu.formatting, p.mu.fmtDone = name, 0
	p.mu.Unlock()
	p.format(name, f)
}

// redo formats a file left in formatting/ by an interrupted run again.
func (p *Pool) redo(name string) {
	f, err := os.OpenFile(filepath.Join(p.fmtDir, name), os.O_WRONLY, 0)
	if err != nil {
		p.formatFailed(name, err)
		return
	}
	p.format(name, f)
}

// format writes zeros over the whole of f, fsyncs it and moves it into
// clean/. On failure the file stays in formatting/ (truncated, so that a
// full disk gets its space back) and growth stops until a Get finds room
// again. When the pool is closing the file is left as it is.
func (p *Pool) format(name string, f *os.File) {
	err := p.writeZeros(f, func(done int64) {
		p.mu.Lock()
		p.mu.fmtDone = done
		p.logProgressLocked()
		p.mu.Unlock()
	})
	if err != nil {
		if p.ctx.Err() != nil {
			_ = f.Close()
			p.mu.Lock()
			p.mu.formatting, p.mu.fmtDone = "", 0
			p.mu.partial = append(p.mu.partial, name)
			p.mu.Unlock()
			return
		}
		_ = f.Truncate(0)
		_ = f.Sync()
		_ = f.Close()
		p.formatFailed(name, err)
		return
	}
	if err := f.Close(); err != nil {
		p.formatFailed(name, err)
		return
	}
	if err := p.promote(p.fmtDir, name); err != nil {
		p.formatFailed(name, err)
		return
	}
	p.mu.Lock()
	p.mu.formatting, p.mu.fmtDone = "", 0
	p.mu.clean = append(p.mu.clean, name)
	p.logProgressLocked()
	p.broadcastLocked()
	p.mu.Unlock()
}

func (p *Pool) formatFailed(name string, err error) {
	reason := fmt.Sprintf("format pool file %s: %v", name, err)
	if fsutil.IsNoSpace(err) {
		reason = fmt.Sprintf("disk full while formatting pool file %s: %v", name, err)
	}
	p.log.Error("chunk file pool format failed", "file", name, "err", err)
	p.mu.Lock()
	p.mu.formatting, p.mu.fmtDone = "", 0
	p.mu.partial = append(p.mu.partial, name)
	p.stopGrowingLocked(reason)
	p.mu.Unlock()
}

// zeroDirty zeroes a recycled file and moves it into clean/.
func (p *Pool) zeroDirty(name string) {
	err := func() error {
		f, err := os.OpenFile(filepath.Join(p.dirtyDir, name), os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		// A file of another size (a foreign or truncated file) is made the
		// pool's size; the zero writes then cover all of it.
		if err := f.Truncate(p.fileSize); err != nil {
			_ = f.Close()
			return err
		}
		if err := p.writeZeros(f, nil); err != nil {
			_ = f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		return p.promote(p.dirtyDir, name)
	}()
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mu.zeroing = ""
	switch {
	case err == nil:
		p.mu.clean = append(p.mu.clean, name)
		p.broadcastLocked()
	case p.ctx.Err() != nil:
		// Closing: the file stays in dirty/ and is zeroed at the next Open.
	default:
		p.log.Error("chunk file pool cannot zero a recycled file; it stays dirty until restart", "file", name, "err", err)
		p.mu.failed = append(p.mu.failed, name)
		p.broadcastLocked()
	}
}

// promote renames a finished file from dir into clean/ and makes the move
// durable.
func (p *Pool) promote(dir, name string) error {
	if err := fsutil.RenameNoReplace(filepath.Join(dir, name), filepath.Join(p.cleanDir, name)); err != nil {
		return err
	}
	if err := fsutil.SyncDir(p.cleanDir); err != nil {
		return err
	}
	return fsutil.SyncDir(dir)
}

// writeZeros writes zeros over [0, FileSize) of f, throttled, then fsyncs it
// and drops it from the page cache. It stops early when the pool closes.
func (p *Pool) writeZeros(f *os.File, progress func(done int64)) error {
	// The zeros go around the page cache when the filesystem allows it
	// (O_DIRECT): copied into the cache they would cost a copy and a
	// writeback of every page, then be dropped again below.
	direct := fsutil.OpenDirect(f.Name())
	defer func() {
		if direct != nil {
			_ = direct.Close()
		}
	}()
	start := time.Now()
	for off := int64(0); off < p.fileSize; {
		if err := p.ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(p.zeros)), p.fileSize-off)
		if hook := p.opts.TestingKnobs.BeforeWrite; hook != nil {
			if err := hook(f.Name(), off); err != nil {
				return err
			}
		}
		w := f
		if direct != nil && off%fsutil.DirectAlign == 0 && n%fsutil.DirectAlign == 0 {
			w = direct
		}
		_, err := w.WriteAt(p.zeros[:n], off)
		if err != nil && w == direct && errors.Is(err, unix.EINVAL) {
			// The device wants a larger alignment: write through the
			// page cache from here on.
			_ = direct.Close()
			direct = nil
			_, err = f.WriteAt(p.zeros[:n], off)
		}
		if err != nil {
			return err
		}
		off += n
		if progress != nil {
			progress(off)
		}
		if rate := p.opts.FormatBytesPerSec; rate > 0 {
			due := start.Add(time.Duration(float64(off) / float64(rate) * float64(time.Second)))
			if d := time.Until(due); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-t.C:
				case <-p.ctx.Done():
					t.Stop()
					return p.ctx.Err()
				}
			}
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	// The zeros are on disk; keep them out of the page cache.
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil && !errors.Is(err, unix.ESPIPE) {
		p.log.Debug("fadvise DONTNEED failed", "file", f.Name(), "err", err)
	}
	return nil
}

// logProgressLocked logs formatting progress at every tenth.
func (p *Pool) logProgressLocked() {
	st := p.statsLocked()
	step := st.FormatPercent / 10
	if step == p.mu.lastLogPct {
		return
	}
	p.mu.lastLogPct = step
	if st.FormatPercent == 100 {
		p.log.Info("chunk file pool formatted", "clean", st.Clean, "owned", st.Owned, "in_use", st.InUse)
		return
	}
	p.log.Info("chunk file pool formatting", "percent", st.FormatPercent, "owned", st.Owned, "target", st.Target)
}
