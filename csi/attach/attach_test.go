package attach_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/internal/testlog"
	"cairn.io/cairn/internal/testtool"
	"cairn.io/cairn/test/faultfs"
)

const mib = 1 << 20

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if testtool.InCI() {
			t.Fatal("attach tests need root (loop devices) in CI")
		}
		t.Skip("attach tests need root (loop devices)")
	}
	faultfs.RequireFUSE(t)
	testtool.Need(t, "losetup")
}

// serve runs Serve on dev in the background and returns its record; the
// returned stop ends it and returns its error.
func serve(t *testing.T, dev blockdev.Device, readOnly bool) (*attach.Record, func() error) {
	t.Helper()
	rec, stop, _ := serveSpec(t, attach.Spec{Volume: "v", Node: "n", ReadOnly: readOnly}, dev)
	return rec, stop
}

// serveSpec is serve with a spec (in a directory of its own); finished is
// closed when Serve returns (stop then returns its error at once).
func serveSpec(t *testing.T, spec attach.Spec, dev blockdev.Device) (rec *attach.Record, stop func() error, finished <-chan struct{}) {
	t.Helper()
	spec.Dir = t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan struct{})
	var serveErr error
	go func() {
		serveErr = attach.Serve(ctx, spec, dev, pw, testlog.New(t))
		pw.Close()
		close(done)
	}()
	line, err := readLine(pr)
	if err != nil {
		cancel()
		<-done
		t.Fatalf("no ready line: %v (serve: %v)", err, serveErr)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	rec = &attach.Record{}
	if err := json.Unmarshal(line, rec); err != nil {
		t.Fatal(err)
	}
	stop = func() error {
		cancel()
		select {
		case <-done:
			return serveErr
		case <-time.After(time.Minute):
			t.Fatal("Serve did not return")
			return nil
		}
	}
	t.Cleanup(func() { _ = stop() })
	return rec, stop, done
}

func readLine(r io.Reader) ([]byte, error) {
	var b []byte
	one := make([]byte, 1)
	for {
		if _, err := r.Read(one); err != nil {
			return nil, err
		}
		if one[0] == '\n' {
			return b, nil
		}
		b = append(b, one[0])
	}
}

func TestLoopDeviceReachesTheVolume(t *testing.T) {
	needRoot(t)
	dev := blockdevtest.New(8 * mib)
	rec, stop := serve(t, dev, false)
	if rec.Device == "" || rec.Pid != os.Getpid() {
		t.Fatalf("record %+v", rec)
	}
	if got, err := attach.ReadRecord(rec.Dir); err != nil || got.Device != rec.Device {
		t.Fatalf("record on disk %+v, %v", got, err)
	}
	// Writes through the loop device land in the volume; a flush of the
	// device flushes it.
	f, err := os.OpenFile(rec.Device, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("cairn!!!"), 128<<10/8)
	if _, err := f.WriteAt(data, 2*mib); err != nil {
		t.Fatal(err)
	}
	flushes := dev.Count(blockdevtest.OpFlush)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if dev.Count(blockdevtest.OpFlush) == flushes {
		t.Fatal("fsync of the loop device did not flush the volume")
	}
	if !bytes.Equal(dev.Contents(2*mib, int64(len(data))), data) {
		t.Fatal("the volume does not hold what was written through the loop device")
	}
	f.Close()

	// The file itself: IO is whole sectors inside the volume; a hole punch
	// unmaps.
	file := filepath.Join(rec.Dir, "fuse", attach.FileName)
	ff, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ff.Close()
	if _, err := ff.WriteAt([]byte("x"), 0); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("unaligned write: %v, want EINVAL", err)
	}
	if _, err := ff.WriteAt(make([]byte, 4096), 8*mib); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past the end: %v, want ENOSPC", err)
	}
	if err := unix.Fallocate(int(ff.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 2*mib, 64<<10); err != nil {
		t.Fatalf("punch hole: %v", err)
	}
	if dev.Count(blockdevtest.OpUnmap) != 1 || !bytes.Equal(dev.Contents(2*mib, 64<<10), make([]byte, 64<<10)) ||
		!bytes.Equal(dev.Contents(2*mib+64<<10, 64<<10), data[64<<10:]) {
		t.Fatal("the hole punch did not unmap exactly its range")
	}

	// The volume grows: the control socket grows the device.
	if err := dev.Resize(16 * mib); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	size, err := rec.Resize(ctx)
	if err != nil || size != 16*mib {
		t.Fatalf("resize: %d, %v", size, err)
	}
	if got := loopSize(t, rec.Device); got != 16*mib {
		t.Fatalf("loop device is %d bytes after the resize, want %d", got, 16*mib)
	}
	st, err := rec.Status(ctx)
	if err != nil || st.Error != "" || st.Size != 16*mib {
		t.Fatalf("status %+v, %v", st, err)
	}
	// A volume that fails its reads is reported.
	dev.SetHook(func(ctx context.Context, c *blockdevtest.Call) error {
		if c.Op == blockdevtest.OpRead {
			return errors.New("no quorum")
		}
		return nil
	})
	if st, err := rec.Status(ctx); err != nil || st.Error == "" {
		t.Fatalf("status of a failing volume %+v, %v", st, err)
	}
	dev.SetHook(nil)

	// Stopping detaches the loop device, unmounts and closes the volume.
	ff.Close()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if !dev.Closed() {
		t.Fatal("the volume was not closed")
	}
	if b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(rec.Device), "loop", "backing_file")); bytes.Contains(b, []byte(rec.Dir)) {
		t.Fatalf("%s still backed by %s", rec.Device, b)
	}
	if err := rec.Cleanup(ctx); err != nil {
		t.Fatalf("cleanup after a clean stop: %v", err)
	}
}

func TestReadOnlyAttachRefusesWrites(t *testing.T) {
	needRoot(t)
	dev := blockdevtest.New(4 * mib)
	rec, _ := serve(t, dev, true)
	// Newer kernels let a read-only block device be opened for writing;
	// the writes fail.
	if w, err := os.OpenFile(rec.Device, os.O_WRONLY, 0); err == nil {
		_, werr := w.WriteAt(make([]byte, 4096), 0)
		serr := w.Sync()
		w.Close()
		if werr == nil && serr == nil {
			t.Fatal("a read-only loop device took a write")
		}
	}
	if _, err := os.OpenFile(filepath.Join(rec.Dir, "fuse", attach.FileName), os.O_RDWR, 0); err == nil {
		t.Fatal("the read-only file opened for writing")
	}
	f, err := os.Open(rec.Device)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if dev.Count(blockdevtest.OpWrite) != 0 {
		t.Fatal("a read-only attach wrote")
	}
}

func loopSize(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sized is a test device with a block size.
type sized struct {
	*blockdevtest.Device
	bs int64
}

func (s sized) BlockSize() int64 { return s.bs }

func TestLoopSectorsAreTheVolumesBlocks(t *testing.T) {
	needRoot(t)
	dev := sized{blockdevtest.New(4 * mib), 4096}
	rec, _ := serve(t, dev, false)
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(rec.Device), "queue", "logical_block_size"))
	if err != nil || string(bytes.TrimSpace(b)) != "4096" {
		t.Fatalf("loop device sector %q, %v; want 4096", b, err)
	}
	ff, err := os.OpenFile(filepath.Join(rec.Dir, "fuse", attach.FileName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ff.Close()
	if _, err := ff.WriteAt(make([]byte, 512), 512); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("a 512-byte write to a 4096-byte-block volume: %v, want EINVAL", err)
	}
	if _, err := ff.WriteAt(bytes.Repeat([]byte{7}, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dev.Contents(4096, 4096), bytes.Repeat([]byte{7}, 4096)) {
		t.Fatal("the block did not reach the volume")
	}
	// A block size a loop device cannot have is refused.
	if err := attach.Serve(context.Background(), attach.Spec{Volume: "big", Dir: t.TempDir()},
		sized{blockdevtest.New(4 * mib), 8192}, io.Discard, testlog.New(t)); err == nil {
		t.Fatal("attached a volume with 8 KiB blocks")
	}
}

func TestStopWaitsWhileTheDeviceIsInUse(t *testing.T) {
	needRoot(t)
	dev := blockdevtest.New(4 * mib)
	rec, stop := serve(t, dev, false)
	// Held exclusively, as a mounted file system holds it.
	fd, err := unix.Open(rec.Device, unix.O_RDWR|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	select {
	case err := <-stopped:
		unix.Close(fd)
		t.Fatalf("Serve returned (%v) while its device was in use", err)
	case <-time.After(1500 * time.Millisecond):
	}
	// Still serving.
	if _, err := unix.Pwrite(fd, bytes.Repeat([]byte{9}, 4096), 0); err != nil {
		t.Fatalf("write while the stop waits: %v", err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dev.Contents(0, 4096), bytes.Repeat([]byte{9}, 4096)) {
		t.Fatal("the write did not reach the volume")
	}
	unix.Close(fd)
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return once the device was released")
	}
	if !dev.Closed() {
		t.Fatal("the volume was not closed")
	}
}
