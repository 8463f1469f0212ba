package iscsi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// fileVolume is the test Backend: a real file, fsynced on Flush, with
// unmapped ranges punched out. latency, when set, is added to every read
// and write to stand in for a replicated backend.
type fileVolume struct {
	f       *os.File
	size    atomic.Int64
	latency time.Duration
	closed  atomic.Bool
	flushes atomic.Int64
	// failReads makes ReadAt fail (fault injection for medium errors).
	failReads atomic.Bool
	// gate, when set, is called before every read and write; tests block
	// in it to hold a command inside the backend.
	gate func(off int64)
}

var errInjected = errors.New("injected backend failure")

func (v *fileVolume) pause(off int64) {
	if v.gate != nil {
		v.gate(off)
	}
	if v.latency > 0 {
		time.Sleep(v.latency)
	}
}

func (v *fileVolume) ReadAt(p []byte, off int64) (int, error) {
	v.pause(off)
	if v.failReads.Load() {
		return 0, errInjected
	}
	return v.f.ReadAt(p, off)
}

func (v *fileVolume) WriteAt(p []byte, off int64) (int, error) {
	v.pause(off)
	if off+int64(len(p)) > v.size.Load() {
		return 0, fmt.Errorf("write past end: %d+%d", off, len(p))
	}
	return v.f.WriteAt(p, off)
}

func (v *fileVolume) UnmapAt(off, length int64) error {
	return unix.Fallocate(int(v.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (v *fileVolume) Flush() error {
	v.flushes.Add(1)
	return v.f.Sync()
}

func (v *fileVolume) Size() int64 { return v.size.Load() }

func (v *fileVolume) Close() error {
	v.closed.Store(true)
	return v.f.Close()
}

// resize grows the file and the reported size.
func (v *fileVolume) resize(n int64) error {
	if err := v.f.Truncate(n); err != nil {
		return err
	}
	v.size.Store(n)
	return nil
}

// fileExports serves file volumes from a directory.
type fileExports struct {
	dir     string
	latency time.Duration
	gate    func(off int64)
	opened  func(name string) // called by Open after the volume is open
	mu      sync.Mutex
	sizes   map[string]int64
	open    map[string]*fileVolume
}

func newFileExports(dir string) *fileExports {
	return &fileExports{dir: dir, sizes: make(map[string]int64), open: make(map[string]*fileVolume)}
}

func (e *fileExports) create(name string, size int64) error {
	f, err := os.Create(filepath.Join(e.dir, name))
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	e.mu.Lock()
	e.sizes[name] = size
	e.mu.Unlock()
	return nil
}

// setLatency makes volumes opened from now on add d to every read and write.
func (e *fileExports) setLatency(d time.Duration) {
	e.mu.Lock()
	e.latency = d
	e.mu.Unlock()
}

// setGate installs a hook called before every read and write of volumes
// opened from now on.
func (e *fileExports) setGate(g func(off int64)) {
	e.mu.Lock()
	e.gate = g
	e.mu.Unlock()
}

// holdAt makes the first read or write at off of volumes opened from now
// on wait inside the backend: entered receives once it is there, and it
// returns when release is closed.
func (e *fileExports) holdAt(off int64) (entered <-chan struct{}, release chan struct{}) {
	in := make(chan struct{}, 1)
	release = make(chan struct{})
	var once sync.Once
	e.setGate(func(o int64) {
		if o == off {
			once.Do(func() {
				in <- struct{}{}
				<-release
			})
		}
	})
	return in, release
}

// setOpened installs a hook Open calls once it has opened a volume, before
// it returns it.
func (e *fileExports) setOpened(f func(name string)) {
	e.mu.Lock()
	e.opened = f
	e.mu.Unlock()
}

func (e *fileExports) remove(name string) {
	e.mu.Lock()
	delete(e.sizes, name)
	e.mu.Unlock()
}

func (e *fileExports) List(context.Context) ([]string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for n := range e.sizes {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

func (e *fileExports) Open(_ context.Context, name string) (Volume, error) {
	e.mu.Lock()
	size, ok := e.sizes[name]
	latency, gate := e.latency, e.gate
	e.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("volume %q: %w", name, ErrNotFound)
	}
	f, err := os.OpenFile(filepath.Join(e.dir, name), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	v := &fileVolume{f: f, latency: latency, gate: gate}
	v.size.Store(size)
	e.mu.Lock()
	e.open[name] = v
	opened := e.opened
	e.mu.Unlock()
	if opened != nil {
		opened(name)
	}
	return v, nil
}

// volume returns the open volume of name, if any.
func (e *fileExports) volume(name string) *fileVolume {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.open[name]
}
