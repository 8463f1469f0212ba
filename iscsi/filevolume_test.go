package iscsi

import (
	"context"
	"os"
	"path/filepath"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
)

// fileExports serves the shared test double's file devices from a
// directory: each volume is a real file (fsynced on Flush, holes punched on
// unmap) opened once as a blockdevtest.Device, and every Open hands out a
// handle of it.
type fileExports struct {
	*blockdevtest.Catalog
	dir string
}

func newFileExports(dir string) *fileExports {
	return &fileExports{Catalog: blockdevtest.NewCatalog(), dir: dir}
}

// create makes a volume of size bytes.
func (e *fileExports) create(name string, size int64) error {
	path := filepath.Join(e.dir, name)
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(path, size); err != nil {
		return err
	}
	d, err := blockdevtest.NewFile(path)
	if err != nil {
		return err
	}
	e.Add(name, d)
	return nil
}

// volume returns the device of name, also after remove.
func (e *fileExports) volume(name string) *blockdevtest.Device {
	return e.Device(name)
}

// closed reports whether name was opened and every handle of it closed.
func (e *fileExports) closed(name string) bool {
	return e.Opens(name) > 0 && e.Live(name) == 0
}

// setLatency makes every read and write of every volume take d longer.
func (e *fileExports) setLatency(d time.Duration) {
	names, _ := e.List(context.Background())
	for _, n := range names {
		e.Device(n).SetLatency(d)
	}
}

// holdAt makes the next read or write at off of the volume hold inside
// the device until the hold is released.
func (e *fileExports) holdAt(name string, off int64) *blockdevtest.Hold {
	return e.Device(name).Hold(func(c blockdevtest.Call) bool {
		return (c.Op == blockdevtest.OpRead || c.Op == blockdevtest.OpWrite) && c.Off == off
	})
}

// remove makes the volume unknown to List and Open; its device stays
// reachable through volume.
func (e *fileExports) remove(name string) { e.Remove(name) }
