package faultfs

import (
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Defaults for Options.
const (
	DefaultMaxUnsyncedBytes = 256 << 20
	DefaultUnsyncedWait     = 30 * time.Second
)

// Options configure a mount. The zero value takes the defaults.
type Options struct {
	// MaxUnsyncedBytes bounds the memory held for pre-images of unsynced
	// pages (default DefaultMaxUnsyncedBytes). It is a soft bound: a write
	// that finds the memory at the bound waits for syncs to free some, so the
	// memory exceeds the bound by at most the requests already admitted
	// (at most 1 MiB each).
	MaxUnsyncedBytes int64
	// UnsyncedWait is how long such a write waits (default
	// DefaultUnsyncedWait) before it fails with EIO, is logged at error level
	// and counted in Stats.LimitFailures.
	UnsyncedWait time.Duration
	// Logger receives the loud failures (default: slog.Default()).
	Logger *slog.Logger
	// Debug logs every FUSE request through Logger at debug level (which
	// the Logger must let through).
	Debug bool
}

// FS is a mounted fault-injecting filesystem. Its methods are safe for
// concurrent use.
type FS struct {
	backing, mountpoint string
	server              *fuse.Server
	log                 *slog.Logger

	// gate is held shared by every FUSE request while it runs and
	// exclusively by Crash and Restart.
	gate    sync.RWMutex
	crashed atomic.Bool
	// unmounted is set (under gate) by Unmount; Restart then stays crashed.
	unmounted bool
	epoch     atomic.Uint64 // incremented by every Crash

	crash crashState

	tr    *tracker
	rules rules
	stats counters

	watchdog    *exec.Cmd // see watchdogScript; nil when it could not start
	unmountOnce sync.Once
	unmountErr  error
}

// counters back Stats.
type counters struct {
	syncs, dirSyncs, writes                 atomic.Uint64
	syncFaults, writeFaults, readFaults     atomic.Uint64
	limitFailures, crashes                  atomic.Uint64
	pagesLost, pagesKept, pagesLostSyncFail atomic.Uint64
}

// Stats are cumulative counters and current usage, for tests to assert that
// a fault fired or that data was in flight.
type Stats struct {
	Syncs    uint64 // successful fsync/fdatasync of files
	DirSyncs uint64 // successful fsync of directories
	Writes   uint64 // write requests that reached a backing file

	SyncFaults  uint64 // fsyncs failed by a FailSync rule
	WriteFaults uint64 // writes failed by a FailWrites rule
	ReadFaults  uint64 // reads failed by a FailReads rule

	// LimitFailures counts writes failed because the unsynced data stayed
	// at Options.MaxUnsyncedBytes for Options.UnsyncedWait.
	LimitFailures uint64

	Crashes          uint64
	PagesLost        uint64 // unsynced pages put back by crashes
	PagesKept        uint64 // unsynced pages a partial crash kept
	PagesLostToSyncs uint64 // unsynced pages put back by failed syncs

	UnsyncedBytes int64 // pre-image bytes held now
	UnsyncedFiles int   // files with unsynced changes now
	Crashed       bool  // between Crash and Restart
}

// Mount mounts a faultfs at mountpoint that passes every operation through
// to the directory backing. Both must be existing directories, neither
// inside the other. As root it mounts with mount(2) directly; otherwise it
// needs fusermount3 or fusermount. Unmount it with Unmount.
func Mount(backing, mountpoint string, opts Options) (*FS, error) {
	if opts.MaxUnsyncedBytes < 0 || opts.UnsyncedWait < 0 {
		return nil, fmt.Errorf("faultfs: negative MaxUnsyncedBytes or UnsyncedWait")
	}
	if opts.MaxUnsyncedBytes == 0 {
		opts.MaxUnsyncedBytes = DefaultMaxUnsyncedBytes
	}
	if opts.UnsyncedWait == 0 {
		opts.UnsyncedWait = DefaultUnsyncedWait
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	backing, mountpoint, err := checkDirs(backing, mountpoint)
	if err != nil {
		return nil, err
	}
	f := &FS{backing: backing, mountpoint: mountpoint, log: opts.Logger.With("component", "faultfs", "mount", mountpoint)}
	f.tr = newTracker(opts.MaxUnsyncedBytes, opts.UnsyncedWait, f.log)

	lbRoot, err := fs.NewLoopbackRoot(backing)
	if err != nil {
		return nil, fmt.Errorf("faultfs: %w", err)
	}
	lb := lbRoot.(*fs.LoopbackNode)
	root := &node{LoopbackNode: lb, fs: f}
	lb.RootData.RootNode = root

	zero := time.Duration(0)
	fopts := &fs.Options{
		EntryTimeout:    &zero,
		AttrTimeout:     &zero,
		NegativeTimeout: &zero,
		MountOptions: fuse.MountOptions{
			FsName:            "faultfs:" + backing,
			Name:              "faultfs",
			DirectMountStrict: os.Geteuid() == 0,
			MaxWrite:          fuse.MAX_KERNEL_WRITE,
			// The kernel must send every read and write to this server:
			// no passthrough to the backing file, no writeback cache.
			DisabledCapabilities: fuse.CAP_PASSTHROUGH | fuse.CAP_WRITEBACK_CACHE,
			Debug:                opts.Debug,
			Logger:               log.New(slogWriter{f.log}, "", 0),
		},
	}
	raw := &gatedFS{RawFileSystem: fs.NewNodeFS(root, fopts), fs: f}
	srv, err := fuse.NewServer(raw, mountpoint, &fopts.MountOptions)
	if err != nil {
		return nil, fmt.Errorf("faultfs: mount %s: %w", mountpoint, err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		_ = srv.Unmount()
		return nil, fmt.Errorf("faultfs: mount %s: %w", mountpoint, err)
	}
	f.server = srv
	if f.watchdog, err = startWatchdog(mountpoint); err != nil {
		f.log.Warn("faultfs: no watchdog: if this process dies while it waits on its own mount, it hangs", "err", err)
	}
	return f, nil
}

// checkDirs makes both paths absolute and checks that they are distinct,
// unnested directories.
func checkDirs(backing, mountpoint string) (string, string, error) {
	var abs [2]string
	for i, p := range []string{backing, mountpoint} {
		if p == "" {
			return "", "", errors.New("faultfs: empty backing or mount directory")
		}
		a, err := filepath.Abs(p)
		if err != nil {
			return "", "", fmt.Errorf("faultfs: %w", err)
		}
		if a, err = filepath.EvalSymlinks(a); err != nil {
			return "", "", fmt.Errorf("faultfs: %w", err)
		}
		st, err := os.Stat(a)
		if err != nil {
			return "", "", fmt.Errorf("faultfs: %w", err)
		}
		if !st.IsDir() {
			return "", "", fmt.Errorf("faultfs: %s is not a directory", a)
		}
		abs[i] = a
	}
	within := func(a, b string) bool { return a == b || strings.HasPrefix(a, b+string(filepath.Separator)) }
	if within(abs[0], abs[1]) || within(abs[1], abs[0]) {
		return "", "", fmt.Errorf("faultfs: backing %s and mount point %s overlap", abs[0], abs[1])
	}
	return abs[0], abs[1], nil
}

// Backing returns the backing directory.
func (f *FS) Backing() string { return f.backing }

// Mountpoint returns the directory the filesystem is mounted at.
func (f *FS) Mountpoint() string { return f.mountpoint }

// Unmount unmounts the filesystem. If the mount is busy (a process still
// has a file open in it) it is detached lazily (MNT_DETACH) so that no
// mount is left behind, and the error says so. Further calls return the
// first result.
func (f *FS) Unmount() error {
	f.unmountOnce.Do(func() {
		if err := f.server.Unmount(); err != nil {
			// The watchdog stays: the detached mount lives until its last
			// file is closed.
			if derr := unix.Unmount(f.mountpoint, unix.MNT_DETACH); derr != nil {
				f.unmountErr = fmt.Errorf("faultfs: unmount %s: %w (lazy unmount: %w)", f.mountpoint, err, derr)
			} else {
				f.unmountErr = fmt.Errorf("faultfs: unmount %s: %w; detached lazily", f.mountpoint, err)
			}
		} else {
			stopWatchdog(f.watchdog)
		}
		// Whatever still runs through a lazily detached mount fails from
		// now on; the data left unsynced stays in the backing files, as
		// after a clean shutdown.
		f.gate.Lock()
		f.unmounted = true
		f.crashed.Store(true)
		f.tr.forgetAll()
		f.gate.Unlock()
	})
	return f.unmountErr
}

// Stats returns the counters.
func (f *FS) Stats() Stats {
	held, files := f.tr.usage()
	c := &f.stats
	return Stats{
		Syncs: c.syncs.Load(), DirSyncs: c.dirSyncs.Load(), Writes: c.writes.Load(),
		SyncFaults: c.syncFaults.Load(), WriteFaults: c.writeFaults.Load(), ReadFaults: c.readFaults.Load(),
		LimitFailures: c.limitFailures.Load(), Crashes: c.crashes.Load(),
		PagesLost: c.pagesLost.Load(), PagesKept: c.pagesKept.Load(), PagesLostToSyncs: c.pagesLostSyncFail.Load(),
		UnsyncedBytes: held, UnsyncedFiles: files, Crashed: f.crashed.Load(),
	}
}

// enter admits a request: it returns false (the request fails with EIO)
// while the filesystem is crashed. A true return must be paired with exit.
func (f *FS) enter() bool {
	f.gate.RLock()
	if f.crashed.Load() {
		f.gate.RUnlock()
		return false
	}
	return true
}

func (f *FS) exit() { f.gate.RUnlock() }

// waitRoom holds back a data-changing request while the unsynced data is at
// its bound (see Options.MaxUnsyncedBytes).
func (f *FS) waitRoom(cancel <-chan struct{}) fuse.Status {
	switch err := f.tr.waitRoom(cancel); {
	case err == nil:
		return fuse.OK
	case errors.Is(err, errLimit):
		f.stats.limitFailures.Add(1)
		return fuse.EIO
	default:
		return fuse.Status(syscall.EINTR)
	}
}

// slogWriter carries go-fuse's log lines to a slog.Logger.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Debug(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var _ io.Writer = slogWriter{}
