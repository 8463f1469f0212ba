package faultfs

import (
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// PageSize is the unit in which unsynced data is tracked and lost: a crash
// restores or keeps whole 4 KiB pages of a file.
const PageSize = 4096

// errLimit is returned by waitRoom when the pre-image memory stayed at its
// limit for the whole wait.
var errLimit = errors.New("faultfs: unsynced-data limit reached")

// tracker holds, for every backing file changed since its last successful
// sync, the pre-image of each page changed and the size at that sync.
type tracker struct {
	limit int64
	wait  time.Duration
	log   *slog.Logger

	mu    sync.Mutex
	files map[uint64]*dirtyFile // by backing inode number
	held  int64                 // pre-image bytes in all files
	freed chan struct{}         // closed (and replaced) whenever held drops
}

// dirtyFile is one file with unsynced changes. It owns a descriptor on the
// backing inode, which keeps the inode (and so its number) alive while the
// entry exists and lets a crash restore it whatever its name now is.
type dirtyFile struct {
	ino  uint64
	fd   int
	path string // path relative to the root when first changed after a sync

	// io is held shared by every modification (capture and apply) and
	// exclusively by a sync, a failed sync and forget, so that a sync never
	// forgets the pre-image of a change it did not flush.
	io   sync.RWMutex
	dead bool // dropped from tracker.files; set with io held exclusively

	mu         sync.Mutex
	syncedSize int64
	pages      map[int64][]byte // page index -> content at the last sync (short at its end of file)
}

func newTracker(limit int64, wait time.Duration, log *slog.Logger) *tracker {
	return &tracker{limit: limit, wait: wait, log: log, files: make(map[uint64]*dirtyFile), freed: make(chan struct{})}
}

// waitRoom blocks while the pre-image memory is at its limit: until a sync
// frees some, the request is cancelled, or the wait times out (errLimit).
func (t *tracker) waitRoom(cancel <-chan struct{}) error {
	var timer *time.Timer
	for {
		t.mu.Lock()
		if t.held < t.limit {
			t.mu.Unlock()
			return nil
		}
		ch := t.freed
		held := t.held
		t.mu.Unlock()
		if timer == nil {
			timer = time.NewTimer(t.wait)
			defer timer.Stop()
		}
		select {
		case <-ch:
		case <-cancel:
			return unix.EINTR
		case <-timer.C:
			t.log.Error("faultfs: unsynced data stayed at its limit; failing the write with EIO",
				"held_bytes", held, "limit_bytes", t.limit, "waited", t.wait)
			return errLimit
		}
	}
}

// releaseLocked returns n bytes of pre-image memory and wakes waiters.
func (t *tracker) releaseLocked(n int64) {
	if n == 0 {
		return
	}
	t.held -= n
	close(t.freed)
	t.freed = make(chan struct{})
}

// change is the byte range a modification may alter: [off, end), or, for a
// truncate (truncTo >= 0), the range between the current size and truncTo.
type change struct {
	off, end int64
	truncTo  int64
}

// modify runs apply, a change of the backing file ino, after saving the
// pre-image of every page that the change may alter and that lies below the
// file's size at its last sync. src is a read-write descriptor on the inode
// (duplicated if the file has no entry yet); path names the file for the
// entry.
func (t *tracker) modify(ino uint64, src int, path func() string, c change, apply func() error) error {
	for {
		df, err := t.entry(ino, src, path)
		if err != nil {
			return err
		}
		df.io.RLock()
		if df.dead {
			df.io.RUnlock()
			continue
		}
		err = t.capture(df, c)
		if err == nil {
			err = apply()
		}
		df.io.RUnlock()
		return err
	}
}

// entry returns the file's entry, creating it (and recording the current
// size as the synced size) when the file has none.
func (t *tracker) entry(ino uint64, src int, path func() string) (*dirtyFile, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if df := t.files[ino]; df != nil {
		return df, nil
	}
	fd, err := unix.FcntlInt(uintptr(src), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("faultfs: dup: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("faultfs: fstat: %w", err)
	}
	df := &dirtyFile{ino: ino, fd: fd, path: path(), syncedSize: st.Size, pages: make(map[int64][]byte)}
	t.files[ino] = df
	return df, nil
}

// capture saves the pre-images of the pages c alters below the synced size
// that are not saved yet.
func (t *tracker) capture(df *dirtyFile, c change) error {
	df.mu.Lock()
	defer df.mu.Unlock()
	off, end := c.off, c.end
	if c.truncTo >= 0 {
		var st unix.Stat_t
		if err := unix.Fstat(df.fd, &st); err != nil {
			return fmt.Errorf("faultfs: fstat: %w", err)
		}
		off, end = min(st.Size, c.truncTo), max(st.Size, c.truncTo)
	}
	end = min(end, df.syncedSize)
	if off >= end {
		return nil
	}
	var added int64
	for p := off / PageSize; p*PageSize < end; p++ {
		if _, ok := df.pages[p]; ok {
			continue
		}
		buf := make([]byte, min(PageSize, df.syncedSize-p*PageSize))
		n, err := preadFull(df.fd, buf, p*PageSize)
		if err != nil {
			return fmt.Errorf("faultfs: save page %d of %s: %w", p, df.path, err)
		}
		df.pages[p] = buf[:n]
		added += int64(n)
	}
	t.mu.Lock()
	t.held += added
	t.mu.Unlock()
	return nil
}

// sync runs doSync (the real fsync of the file) and, when it succeeds,
// forgets the file's pre-images: its data is durable.
func (t *tracker) sync(ino uint64, doSync func() error) error {
	t.mu.Lock()
	df := t.files[ino]
	t.mu.Unlock()
	if df == nil {
		return doSync()
	}
	df.io.Lock()
	defer df.io.Unlock()
	if err := doSync(); err != nil {
		return err
	}
	if !df.dead {
		t.drop(df)
	}
	return nil
}

// discard restores the file's unsynced pages and size and forgets them, as
// a failed writeback does; it returns the pages lost.
func (t *tracker) discard(ino uint64) (int, error) {
	t.mu.Lock()
	df := t.files[ino]
	t.mu.Unlock()
	if df == nil {
		return 0, nil
	}
	df.io.Lock()
	defer df.io.Unlock()
	if df.dead {
		return 0, nil
	}
	lost, _, err := df.restore(0, 0)
	t.drop(df)
	return lost, err
}

// forgetIfOrphan drops the entry of ino when the inode has no name left:
// nothing that a crash could restore is reachable any more.
func (t *tracker) forgetIfOrphan(ino uint64) {
	t.mu.Lock()
	df := t.files[ino]
	t.mu.Unlock()
	if df == nil {
		return
	}
	df.io.Lock()
	defer df.io.Unlock()
	var st unix.Stat_t
	if df.dead || unix.Fstat(df.fd, &st) != nil || st.Nlink != 0 {
		return
	}
	t.drop(df)
}

// drop removes an entry whose io lock the caller holds exclusively.
func (t *tracker) drop(df *dirtyFile) {
	df.dead = true
	df.mu.Lock()
	var n int64
	for _, b := range df.pages {
		n += int64(len(b))
	}
	df.pages = nil
	df.mu.Unlock()
	unix.Close(df.fd)
	t.mu.Lock()
	delete(t.files, df.ino)
	t.releaseLocked(n)
	t.mu.Unlock()
}

// forgetAll drops every entry without restoring anything. The caller
// guarantees that no operation runs.
func (t *tracker) forgetAll() {
	t.mu.Lock()
	files := make([]*dirtyFile, 0, len(t.files))
	for _, df := range t.files {
		files = append(files, df)
	}
	t.mu.Unlock()
	for _, df := range files {
		df.io.Lock()
		t.drop(df)
		df.io.Unlock()
	}
}

// usage returns the pre-image bytes held and the files with unsynced
// changes.
func (t *tracker) usage() (int64, int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.held, len(t.files)
}

// crash puts every file back to its state at its last sync, keeping each
// unsynced page (and each changed size) with probability keep, decided by
// seed. The caller guarantees that no operation runs.
func (t *tracker) crash(keep float64, seed uint64) (CrashReport, error) {
	t.mu.Lock()
	files := make([]*dirtyFile, 0, len(t.files))
	for _, df := range t.files {
		files = append(files, df)
	}
	t.mu.Unlock()
	sort.Slice(files, func(i, j int) bool { return files[i].path < files[j].path })
	var rep CrashReport
	var errs []error
	for _, df := range files {
		df.io.Lock()
		lost, kept, err := df.restore(keep, seed)
		if err != nil {
			errs = append(errs, err)
		}
		rep.Files++
		rep.PagesLost += lost
		rep.PagesKept += kept
		t.drop(df)
		df.io.Unlock()
	}
	return rep, errors.Join(errs...)
}

// restore writes back the file's state at its last sync, except for pages
// that the draw keeps. It returns the pages put back and the pages kept.
func (df *dirtyFile) restore(keep float64, seed uint64) (lost, kept int, err error) {
	df.mu.Lock()
	defer df.mu.Unlock()
	var st unix.Stat_t
	if err := unix.Fstat(df.fd, &st); err != nil {
		return 0, 0, fmt.Errorf("faultfs: restore %s: %w", df.path, err)
	}
	cur, synced := st.Size, df.syncedSize
	draw := func(i int64) bool { return keep > 0 && pageKept(seed, df.path, i, keep) }
	final := synced
	if cur != synced && draw(-1) {
		final = cur
	}
	idx := make([]int64, 0, len(df.pages))
	for p := range df.pages {
		idx = append(idx, p)
	}
	if keep > 0 {
		// Pages past the synced size have no pre-image: their old content
		// is zeros (or nothing, past the final size).
		for p := synced / PageSize; p*PageSize < cur; p++ {
			if _, ok := df.pages[p]; !ok {
				idx = append(idx, p)
			}
		}
	}
	sort.Slice(idx, func(i, j int) bool { return idx[i] < idx[j] })
	zero := make([]byte, PageSize)
	for _, p := range idx {
		if draw(p) {
			kept++
			continue
		}
		lost++
		start := p * PageSize
		if start >= final {
			continue
		}
		limit := min(PageSize, final-start)
		var buf []byte
		if pre, ok := df.pages[p]; ok {
			buf = append(append(make([]byte, 0, PageSize), pre...), zero[:PageSize-len(pre)]...)[:limit]
		} else {
			// The old content below the synced size is the current one.
			from := max(start, synced) - start
			if from >= limit {
				continue
			}
			buf, start = zero[:limit-from], start+from
		}
		if _, err := unix.Pwrite(df.fd, buf, start); err != nil {
			return lost, kept, fmt.Errorf("faultfs: restore page %d of %s: %w", p, df.path, err)
		}
	}
	if err := unix.Ftruncate(df.fd, final); err != nil {
		return lost, kept, fmt.Errorf("faultfs: restore size of %s: %w", df.path, err)
	}
	return lost, kept, nil
}

// pageKept decides, from the seed, the file's path and the page index (-1
// for the file size), whether an unsynced page survives a partial crash.
func pageKept(seed uint64, path string, page int64, keep float64) bool {
	h := fnv.New64a()
	h.Write([]byte(path))
	x := splitmix(seed ^ h.Sum64() ^ splitmix(uint64(page)))
	return float64(x>>11)/(1<<53) < keep
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// preadFull reads into buf at off until buf is full or the file ends.
func preadFull(fd int, buf []byte, off int64) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := unix.Pread(fd, buf[n:], off+int64(n))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return n, nil
}
