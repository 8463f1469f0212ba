package faultfs

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkPwriteFdatasync measures 4 KiB pwrite + fdatasync cycles over a
// 16 MiB preallocated file, directly on the backing directory and through
// the mount (the cost of FUSE and of saving pre-images).
func BenchmarkPwriteFdatasync(b *testing.B) { benchPwrite(b, true) }

// BenchmarkPwrite is BenchmarkPwriteFdatasync without the syncs, with a
// sync every 1024 writes to keep the pre-images bounded: the per-request
// cost of the layer.
func BenchmarkPwrite(b *testing.B) { benchPwrite(b, false) }

func benchPwrite(b *testing.B, syncEach bool) {
	const fileSize = 16 << 20
	run := func(b *testing.B, path string) {
		fd, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			b.Fatal(err)
		}
		defer fd.Close()
		if _, err := fd.WriteAt(make([]byte, fileSize), 0); err != nil {
			b.Fatal(err)
		}
		if err := fd.Sync(); err != nil {
			b.Fatal(err)
		}
		buf := randBytes(1, PageSize)
		b.SetBytes(PageSize)
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			if _, err := unix.Pwrite(int(fd.Fd()), buf, int64(i%(fileSize/PageSize))*PageSize); err != nil {
				b.Fatal(err)
			}
			if !syncEach && i%1024 != 1023 {
				continue
			}
			if err := unix.Fdatasync(int(fd.Fd())); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("direct", func(b *testing.B) { run(b, filepath.Join(b.TempDir(), "f")) })
	b.Run("faultfs", func(b *testing.B) {
		f := MountForTest(b, Options{})
		run(b, f.Path("f"))
	})
}
