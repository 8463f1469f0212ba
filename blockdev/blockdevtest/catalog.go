package blockdevtest

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"cairn.io/cairn/blockdev"
)

// Catalog is a blockdev.Catalog of test Devices. Open hands out a Handle
// per call, all sharing the named Device; the Catalog counts the handles
// not yet closed.
type Catalog struct {
	mu     sync.Mutex
	devs   map[string]*Device
	gone   map[string]bool // removed: hidden from List and Open
	live   map[string]int
	opens  map[string]int
	onOpen func(ctx context.Context, name string) error
}

// NewCatalog returns an empty catalog.
func NewCatalog() *Catalog {
	return &Catalog{devs: map[string]*Device{}, gone: map[string]bool{}, live: map[string]int{}, opens: map[string]int{}}
}

// Add makes d available under name (replacing any device of that name).
func (c *Catalog) Add(name string, d *Device) {
	c.mu.Lock()
	c.devs[name] = d
	delete(c.gone, name)
	c.mu.Unlock()
}

// Remove makes name unknown to later List and Open calls; handles already
// open keep working and Device still returns the device.
func (c *Catalog) Remove(name string) {
	c.mu.Lock()
	c.gone[name] = true
	c.mu.Unlock()
}

// Device returns the device of name (also after Remove), or nil.
func (c *Catalog) Device(name string) *Device {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.devs[name]
}

// OnOpen installs f, called by Open after it found the device and before
// it returns a handle; an error from f fails the Open.
func (c *Catalog) OnOpen(f func(ctx context.Context, name string) error) {
	c.mu.Lock()
	c.onOpen = f
	c.mu.Unlock()
}

// Live returns how many handles of name are open (opened and not closed).
func (c *Catalog) Live(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.live[name]
}

// Opens returns how many times name was opened.
func (c *Catalog) Opens(name string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.opens[name]
}

// List returns the names of the devices, sorted.
func (c *Catalog) List(context.Context) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	names := make([]string, 0, len(c.devs))
	for n := range c.devs {
		if !c.gone[n] {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names, nil
}

// Open returns a new Handle of the named device, or an error wrapping
// blockdev.ErrNotFound.
func (c *Catalog) Open(ctx context.Context, name string) (blockdev.Device, error) {
	c.mu.Lock()
	d := c.devs[name]
	if c.gone[name] {
		d = nil
	}
	hook := c.onOpen
	c.mu.Unlock()
	if d == nil {
		return nil, fmt.Errorf("device %q: %w", name, blockdev.ErrNotFound)
	}
	if hook != nil {
		if err := hook(ctx, name); err != nil {
			return nil, err
		}
	}
	c.mu.Lock()
	c.live[name]++
	c.opens[name]++
	c.mu.Unlock()
	return &Handle{Device: d, release: func() {
		c.mu.Lock()
		c.live[name]--
		c.mu.Unlock()
	}}, nil
}

// Handle is one user's view of a shared Device: its Close ends the handle,
// not the device, and panics when called twice (a frontend must close what
// it opened exactly once).
type Handle struct {
	*Device
	release func()
	closed  atomic.Bool
}

// Close releases the handle.
func (h *Handle) Close() error {
	if h.closed.Swap(true) {
		panic("blockdevtest: handle closed twice")
	}
	h.release()
	return nil
}

// ReadAt reads through the shared device; it fails after Close.
func (h *Handle) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	return h.Device.ReadAt(ctx, p, off)
}

// WriteAt writes through the shared device; it fails after Close.
func (h *Handle) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if h.closed.Load() {
		return 0, ErrClosed
	}
	return h.Device.WriteAt(ctx, p, off)
}

// UnmapAt unmaps through the shared device; it fails after Close.
func (h *Handle) UnmapAt(ctx context.Context, off, length int64) error {
	if h.closed.Load() {
		return ErrClosed
	}
	return h.Device.UnmapAt(ctx, off, length)
}

// Flush flushes the shared device; it fails after Close.
func (h *Handle) Flush(ctx context.Context) error {
	if h.closed.Load() {
		return ErrClosed
	}
	return h.Device.Flush(ctx)
}

var (
	_ blockdev.Device  = (*Device)(nil)
	_ blockdev.Device  = (*Handle)(nil)
	_ blockdev.Catalog = (*Catalog)(nil)
)
