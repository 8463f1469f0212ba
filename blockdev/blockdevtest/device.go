package blockdevtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev"
)

// Op names the kind of a call into a Device.
type Op int

// The operations of a Device.
const (
	OpRead Op = iota
	OpWrite
	OpUnmap
	OpFlush
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpUnmap:
		return "unmap"
	case OpFlush:
		return "flush"
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// Call describes one call into a Device, as hooks and holds see it.
type Call struct {
	Op  Op
	Off int64
	Len int64
	// Data is the caller's buffer: the bytes a write stores, or the
	// buffer a read fills (not yet filled when the hook runs).
	Data []byte
	// Partial, set by a hook that returns an error for a read or a
	// write, makes the device perform the first Partial bytes before it
	// reports the error with n = Partial.
	Partial int
}

// Hook runs before the device performs a call. It may block, panic, or
// return an error: the call then fails with it (after performing
// c.Partial bytes of a read or write) instead of being performed.
type Hook func(ctx context.Context, c *Call) error

// ErrClosed is returned by the calls of a Device or Handle after Close.
var ErrClosed = errors.New("blockdevtest: device closed")

// ErrOutOfRange is returned for a call beyond the device's size.
var ErrOutOfRange = errors.New("blockdevtest: IO beyond the end of the device")

// Device is an in-memory or file-backed blockdev.Device for tests. The zero
// value is not usable; create one with New or NewFile.
type Device struct {
	file *os.File // nil for an in-memory device
	size atomic.Int64

	mu   sync.RWMutex // guards data and serialises Resize against IO
	data []byte

	latency atomic.Int64 // see SetLatency

	hmu      sync.Mutex
	hook     Hook
	holds    []*Hold
	onRead   func(off int64, p []byte)
	closed   atomic.Bool
	inflight atomic.Int64
	peak     atomic.Int64
	counts   [4]atomic.Int64
	bytes    [4]atomic.Int64
	events   []string
	record   bool
}

// New returns an in-memory device of size bytes, all zeros.
func New(size int64) *Device {
	d := &Device{data: make([]byte, size)}
	d.size.Store(size)
	return d
}

// NewFile returns a device stored in the file at path (which must exist);
// its size is the file's. Flush fsyncs the file, UnmapAt punches a hole.
func NewFile(path string) (*Device, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("blockdevtest: open %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blockdevtest: stat %s: %w", path, err)
	}
	d := &Device{file: f}
	d.size.Store(st.Size())
	return d, nil
}

// SetLatency delays every later read and write (not unmap and flush) by
// lat, to stand in for a replicated store; the delay ends early when the
// call's context ends.
func (d *Device) SetLatency(lat time.Duration) { d.latency.Store(int64(lat)) }

// SetHook installs h (nil removes it); it runs before every later call.
func (d *Device) SetHook(h Hook) {
	d.hmu.Lock()
	d.hook = h
	d.hmu.Unlock()
}

// SetReadFilter installs f, called with the data of every successful read
// before it is returned (to corrupt it, for example).
func (d *Device) SetReadFilter(f func(off int64, p []byte)) {
	d.hmu.Lock()
	d.onRead = f
	d.hmu.Unlock()
}

// Record starts recording every performed write, unmap and flush as an
// event ("write 4096", "unmap 0", "flush"), returned by Events.
func (d *Device) Record() {
	d.hmu.Lock()
	d.record = true
	d.hmu.Unlock()
}

// Events returns the events recorded since Record.
func (d *Device) Events() []string {
	d.hmu.Lock()
	defer d.hmu.Unlock()
	return append([]string(nil), d.events...)
}

// Count returns how many calls of op were performed (not failed by a hook).
func (d *Device) Count(op Op) int64 { return d.counts[op].Load() }

// Bytes returns the bytes of performed calls of op.
func (d *Device) Bytes(op Op) int64 { return d.bytes[op].Load() }

// InFlight returns the calls inside the device now (hooks and holds
// included).
func (d *Device) InFlight() int64 { return d.inflight.Load() }

// PeakInFlight returns the largest InFlight seen.
func (d *Device) PeakInFlight() int64 { return d.peak.Load() }

// Closed reports whether Close was called.
func (d *Device) Closed() bool { return d.closed.Load() }

// Size returns the device's size in bytes.
func (d *Device) Size() int64 { return d.size.Load() }

// Resize changes the size (growing with zeros).
func (d *Device) Resize(n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.file != nil {
		if err := d.file.Truncate(n); err != nil {
			return fmt.Errorf("blockdevtest: resize: %w", err)
		}
	} else if n > int64(len(d.data)) {
		d.data = append(d.data, make([]byte, n-int64(len(d.data)))...)
	} else {
		d.data = d.data[:n]
	}
	d.size.Store(n)
	return nil
}

// Contents returns a copy of bytes [off, off+n) as stored, bypassing hooks
// and counters.
func (d *Device) Contents(off, n int64) []byte {
	d.mu.RLock()
	defer d.mu.RUnlock()
	out := make([]byte, n)
	if d.file != nil {
		_, _ = d.file.ReadAt(out, off)
		return out
	}
	copy(out, d.data[off:])
	return out
}

// enter runs the holds and the hook of a call; a nil error lets it go on.
// The caller calls leave with the hold it got once the call returns.
func (d *Device) enter(ctx context.Context, c *Call) (*Hold, error) {
	n := d.inflight.Add(1)
	for {
		p := d.peak.Load()
		if n <= p || d.peak.CompareAndSwap(p, n) {
			break
		}
	}
	if d.closed.Load() {
		return nil, ErrClosed
	}
	d.hmu.Lock()
	var hold *Hold
	for i, h := range d.holds {
		if h.match(*c) {
			hold = h
			d.holds = append(d.holds[:i:i], d.holds[i+1:]...)
			break
		}
	}
	hook := d.hook
	d.hmu.Unlock()
	if hold != nil {
		hold.wait(ctx, *c)
	}
	if hook != nil {
		if err := hook(ctx, c); err != nil {
			return hold, err
		}
	}
	if lat := time.Duration(d.latency.Load()); lat > 0 && (c.Op == OpRead || c.Op == OpWrite) {
		t := time.NewTimer(lat)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return hold, ctx.Err()
		}
	}
	return hold, nil
}

func (d *Device) leave(h *Hold) {
	d.inflight.Add(-1)
	if h != nil {
		close(h.returned)
	}
}

func (d *Device) done(c *Call, n int64) {
	d.counts[c.Op].Add(1)
	d.bytes[c.Op].Add(n)
	d.hmu.Lock()
	if d.record && c.Op != OpRead {
		if c.Op == OpFlush {
			d.events = append(d.events, "flush")
		} else {
			d.events = append(d.events, fmt.Sprintf("%s %d", c.Op, c.Off))
		}
	}
	d.hmu.Unlock()
}

func (d *Device) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > d.size.Load() {
		return fmt.Errorf("%w: [%d, %d) of %d bytes", ErrOutOfRange, off, off+n, d.size.Load())
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (d *Device) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	c := &Call{Op: OpRead, Off: off, Len: int64(len(p)), Data: p}
	h, err := d.enter(ctx, c)
	defer d.leave(h)
	if err != nil {
		if c.Partial > 0 {
			n, _ := d.read(p[:c.Partial], off)
			return n, err
		}
		return 0, err
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.read(p, off)
	if err != nil {
		return n, err
	}
	d.hmu.Lock()
	f := d.onRead
	d.hmu.Unlock()
	if f != nil {
		f(off, p)
	}
	d.done(c, int64(n))
	return n, nil
}

func (d *Device) read(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.file != nil {
		return d.file.ReadAt(p, off)
	}
	return copy(p, d.data[off:]), nil
}

// WriteAt writes p at off.
func (d *Device) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	c := &Call{Op: OpWrite, Off: off, Len: int64(len(p)), Data: p}
	h, err := d.enter(ctx, c)
	defer d.leave(h)
	if err != nil {
		if c.Partial > 0 {
			n, _ := d.write(p[:c.Partial], off)
			return n, err
		}
		return 0, err
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := d.write(p, off)
	if err != nil {
		return n, err
	}
	d.done(c, int64(n))
	return n, nil
}

func (d *Device) write(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.file != nil {
		return d.file.WriteAt(p, off)
	}
	return copy(d.data[off:], p), nil
}

// UnmapAt zeroes [off, off+length) (punches a hole in a file device).
func (d *Device) UnmapAt(ctx context.Context, off, length int64) error {
	c := &Call{Op: OpUnmap, Off: off, Len: length}
	h, err := d.enter(ctx, c)
	defer d.leave(h)
	if err != nil {
		return err
	}
	if err := d.check(off, length); err != nil {
		return err
	}
	d.mu.Lock()
	if d.file != nil {
		if err := unix.Fallocate(int(d.file.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); err != nil {
			d.mu.Unlock()
			return fmt.Errorf("blockdevtest: punch hole at %d length %d: %w", off, length, err)
		}
	} else {
		clear(d.data[off : off+length])
	}
	d.mu.Unlock()
	d.done(c, length)
	return nil
}

// Flush fsyncs a file device; it only counts for an in-memory one.
func (d *Device) Flush(ctx context.Context) error {
	c := &Call{Op: OpFlush}
	h, err := d.enter(ctx, c)
	defer d.leave(h)
	if err != nil {
		return err
	}
	if d.file != nil {
		if err := d.file.Sync(); err != nil {
			return fmt.Errorf("blockdevtest: fsync: %w", err)
		}
	}
	d.done(c, 0)
	return nil
}

// Close closes the device (and its file); later calls fail with ErrClosed.
func (d *Device) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	if d.file != nil {
		return d.file.Close()
	}
	return nil
}

// Hold holds one call inside a device until the test releases it.
type Hold struct {
	match    func(Call) bool
	entered  chan struct{}
	release  chan struct{}
	returned chan struct{}
	once     sync.Once

	mu  sync.Mutex
	ctx context.Context
}

// Hold makes the first later call for which match returns true wait inside
// the device (before its hook, before it is performed) until Release. The
// wait ignores the call's context on purpose: it stands for a store that
// has the request in hand and cannot take it back.
func (d *Device) Hold(match func(Call) bool) *Hold {
	h := &Hold{match: match, entered: make(chan struct{}), release: make(chan struct{}), returned: make(chan struct{})}
	d.hmu.Lock()
	d.holds = append(d.holds, h)
	d.hmu.Unlock()
	return h
}

// HoldAt holds the first later call of op at offset off.
func (d *Device) HoldAt(op Op, off int64) *Hold {
	return d.Hold(func(c Call) bool { return c.Op == op && c.Off == off })
}

func (h *Hold) wait(ctx context.Context, _ Call) {
	h.mu.Lock()
	h.ctx = ctx
	h.mu.Unlock()
	close(h.entered)
	<-h.release
}

// Entered is closed once the held call is waiting inside the device.
func (h *Hold) Entered() <-chan struct{} { return h.entered }

// Release lets the held call go on (it is then performed, unless its hook
// fails it). Safe to call more than once.
func (h *Hold) Release() { h.once.Do(func() { close(h.release) }) }

// Returned is closed once the held call has returned from the device
// (performed or failed).
func (h *Hold) Returned() <-chan struct{} { return h.returned }

// Cancelled reports whether the held call's context has ended; false until
// the call entered.
func (h *Hold) Cancelled() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ctx != nil && h.ctx.Err() != nil
}

// MapGranularity is the unit in which Map tells holes from data.
const MapGranularity = 64 << 10

// Map implements blockdev.Mapper. The double keeps no allocation map: a
// MapGranularity-aligned run that reads as all zeros counts as a hole.
func (d *Device) Map(ctx context.Context, off, length int64) ([]blockdev.Extent, error) {
	if err := d.check(off, length); err != nil {
		return nil, err
	}
	var out []blockdev.Extent
	buf := make([]byte, MapGranularity)
	for length > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		n := min(length, MapGranularity-off%MapGranularity)
		if _, err := d.read(buf[:n], off); err != nil {
			return nil, err
		}
		hole := !slices.ContainsFunc(buf[:n], func(b byte) bool { return b != 0 })
		if k := len(out) - 1; k >= 0 && out[k].Hole == hole {
			out[k].Length += n
		} else {
			out = append(out, blockdev.Extent{Length: n, Hole: hole})
		}
		off, length = off+n, length-n
	}
	return out, nil
}
