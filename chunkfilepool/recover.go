package chunkfilepool

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/chunkfilepool/fsutil"
)

// openDir creates or validates the directory and loads the file lists.
func (p *Pool) openDir() error {
	if err := os.MkdirAll(p.dir, 0o755); err != nil {
		return fmt.Errorf("chunkfilepool: create %s: %w", p.dir, err)
	}
	lock, err := os.Open(p.dir)
	if err != nil {
		return fmt.Errorf("chunkfilepool: %w", err)
	}
	p.lockFd = lock
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("%w: %s", ErrLocked, p.dir)
		}
		return fmt.Errorf("chunkfilepool: lock %s: %w", p.dir, err)
	}

	metaPath := filepath.Join(p.dir, metaFileName)
	raw, err := os.ReadFile(metaPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		for _, d := range []string{p.cleanDir, p.dirtyDir, p.fmtDir} {
			if _, err := os.Stat(d); err == nil {
				return fmt.Errorf("%w: %s has pool directories but no %s", ErrBadMeta, p.dir, metaFileName)
			}
		}
		if err := fsutil.WriteFileAtomic(metaPath, EncodePoolMeta(p.geo), 0o644); err != nil {
			return fmt.Errorf("chunkfilepool: %w", err)
		}
		p.log.Info("chunk file pool created", "geometry", p.geo.String())
	case err != nil:
		return fmt.Errorf("%w: %w", ErrBadMeta, err)
	default:
		got, err := DecodePoolMeta(raw)
		if err != nil {
			return fmt.Errorf("%s: %w", metaPath, err)
		}
		if got != p.geo {
			return fmt.Errorf("%w: %s was formatted with %s; this chunkserver is configured for %s",
				ErrConfigMismatch, p.dir, got, p.geo)
		}
	}
	for _, d := range []string{p.cleanDir, p.dirtyDir, p.fmtDir} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("chunkfilepool: %w", err)
		}
	}
	if err := fsutil.SyncDir(p.dir); err != nil {
		return fmt.Errorf("chunkfilepool: %w", err)
	}

	owned := 0
	raw, err = os.ReadFile(filepath.Join(p.dir, stateFileName))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("%w: %w", ErrBadMeta, err)
	default:
		if owned, err = decodePoolState(raw); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(p.dir, stateFileName), err)
		}
	}

	var maxSeq uint64
	noteSeq := func(name string) {
		if s, ok := strings.CutPrefix(name, recycledPrefix); ok {
			if n, err := strconv.ParseUint(s, 10, 64); err == nil && n >= maxSeq {
				maxSeq = n + 1
			}
		}
	}
	clean, err := listFiles(p.cleanDir)
	if err != nil {
		return err
	}
	for _, e := range clean {
		noteSeq(e.name)
		if e.size != p.fileSize {
			// Only complete, fsynced files are renamed into clean/, so this
			// is damage from outside; zero the file again before trusting it.
			p.log.Warn("clean pool file has the wrong size; zeroing it again", "file", e.name, "size", e.size, "want", p.fileSize)
			if err := fsutil.RenameatNoReplace(unix.AT_FDCWD, filepath.Join(p.cleanDir, e.name), unix.AT_FDCWD, filepath.Join(p.dirtyDir, e.name)); err != nil {
				return fmt.Errorf("chunkfilepool: %w", err)
			}
			p.mu.dirty = append(p.mu.dirty, e.name)
			continue
		}
		p.mu.clean = append(p.mu.clean, e.name)
	}
	dirty, err := listFiles(p.dirtyDir)
	if err != nil {
		return err
	}
	moved := make(map[string]bool, len(p.mu.dirty))
	for _, name := range p.mu.dirty {
		moved[name] = true
	}
	for _, e := range dirty {
		noteSeq(e.name)
		if !moved[e.name] {
			p.mu.dirty = append(p.mu.dirty, e.name)
		}
	}
	partial, err := listFiles(p.fmtDir)
	if err != nil {
		return err
	}
	for _, e := range partial {
		n, err := strconv.Atoi(e.name)
		if err != nil || n <= 0 {
			// Not a name the formatter gives; nothing references it.
			p.log.Warn("removing unknown file from the formatting directory", "file", e.name)
			if err := os.Remove(filepath.Join(p.fmtDir, e.name)); err != nil {
				return fmt.Errorf("chunkfilepool: %w", err)
			}
			continue
		}
		// The formatter names a new file owned+1 and records the new count
		// after creating it; a file above the count was created just before
		// a crash. Count it and format it again.
		owned = max(owned, n)
		p.mu.partial = append(p.mu.partial, e.name)
	}
	if err := fsutil.SyncDir(p.cleanDir); err != nil {
		return fmt.Errorf("chunkfilepool: %w", err)
	}
	if err := fsutil.SyncDir(p.fmtDir); err != nil {
		return fmt.Errorf("chunkfilepool: %w", err)
	}
	if err := p.writeState(owned); err != nil {
		return err
	}
	p.mu.owned = owned
	p.mu.target = max(owned, p.opts.InitialChunks)
	p.mu.recycleSeq = maxSeq
	return nil
}

type dirEntry struct {
	name string
	size int64
}

// listFiles lists the regular files of dir, sorted by name so that files are
// handed out in a stable order.
func listFiles(dir string) ([]dirEntry, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("chunkfilepool: %w", err)
	}
	out := make([]dirEntry, 0, len(ents))
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if err != nil {
			return nil, fmt.Errorf("chunkfilepool: %w", err)
		}
		out = append(out, dirEntry{name: e.Name(), size: info.Size()})
	}
	slices.SortFunc(out, func(a, b dirEntry) int {
		if len(a.name) != len(b.name) {
			return len(a.name) - len(b.name)
		}
		return strings.Compare(a.name, b.name)
	})
	return out, nil
}

func (p *Pool) writeState(owned int) error {
	if err := fsutil.WriteFileAtomic(filepath.Join(p.dir, stateFileName), encodePoolState(owned), 0o644); err != nil {
		return fmt.Errorf("chunkfilepool: %w", err)
	}
	return nil
}
