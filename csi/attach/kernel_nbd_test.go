package attach_test

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/csi/attach/kernelnbd"
)

// needKernelNBD skips a test of the real kernel nbd driver unless it was
// asked for and can run. Deliberately not testtool.Need, which fails in
// CI: most machines (this project's included) have no nbd module, and the
// test configures the machine's /dev/nbd devices, so it runs only on
// request.
func needKernelNBD(t *testing.T) {
	t.Helper()
	if os.Getenv("CAIRN_KERNEL_NBD") != "1" {
		t.Skip("kernel NBD test not asked for: set CAIRN_KERNEL_NBD=1 to run it (it configures this machine's /dev/nbd devices; needs root and the nbd module)")
	}
	if !kernelnbd.Loaded() {
		t.Skip("CAIRN_KERNEL_NBD=1, but the nbd kernel module is not loaded here (modprobe nbd); the fake-kernel tests cover the attach without it")
	}
	if os.Geteuid() != 0 {
		t.Skip("CAIRN_KERNEL_NBD=1, but the nbd netlink commands need root (CAP_SYS_ADMIN)")
	}
}

func TestKernelNBDAttach(t *testing.T) {
	needKernelNBD(t)
	dev := blockdevtest.New(64 * mib)
	rec, stop, _ := serveSpec(t, attach.Spec{Volume: "cairn-kernel-nbd-test", Node: "n", Attach: attach.AttachNBD,
		ReattachTimeout: 30 * time.Second}, dev)
	idx, err := kernelnbd.IndexOf(rec.Device)
	if err != nil {
		t.Fatal(err)
	}
	st := kernelnbd.StateOf(idx)
	if !st.Connected || st.Size != 64*mib || (st.HasBackend && st.Backend != rec.Backend) {
		t.Fatalf("%s: %+v (record %+v)", rec.Device, st, rec)
	}
	f, err := os.OpenFile(rec.Device, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// A write and fsync reach the volume and flush it.
	data := bytes.Repeat([]byte("kernel!!"), 256<<10/8)
	if _, err := f.WriteAt(data, 4*mib); err != nil {
		t.Fatal(err)
	}
	flushes := dev.Count(blockdevtest.OpFlush)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dev.Contents(4*mib, int64(len(data))), data) || dev.Count(blockdevtest.OpFlush) == flushes {
		t.Fatal("a write and fsync of the device did not reach and flush the volume")
	}
	// A range never read through the device is read from the volume.
	fresh := bytes.Repeat([]byte{0x5a}, 64<<10)
	if _, err := dev.WriteAt(context.Background(), fresh, 20*mib); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(fresh))
	if _, err := f.ReadAt(got, 20*mib); err != nil || !bytes.Equal(got, fresh) {
		t.Fatalf("read through the device: %v (equal %t)", err, bytes.Equal(got, fresh))
	}
	// A discard unmaps.
	rng := [2]uint64{32 * mib, mib}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&rng))); errno != 0 {
		t.Fatalf("BLKDISCARD: %v", errno)
	}
	if dev.Count(blockdevtest.OpUnmap) == 0 {
		t.Fatal("a discard of the device did not unmap")
	}
	// Growing: RECONFIGURE with the new size (Linux 5.3 and later).
	if err := dev.Resize(128 * mib); err != nil {
		t.Fatal(err)
	}
	if size, err := rec.Resize(context.Background()); err != nil || size != 128*mib {
		t.Fatalf("resize: %d, %v", size, err)
	}
	if n, err := f.Seek(0, 2); err != nil || n != 128*mib {
		t.Fatalf("%s is %d bytes after the resize (%v)", rec.Device, n, err)
	}
	f.Close()
	// Stopping disconnects the device.
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if kernelnbd.StateOf(idx).Connected {
		t.Fatalf("%s still configured after the stop", rec.Device)
	}
	if !dev.Closed() {
		t.Fatal("the volume was not closed")
	}
}

// A device whose server died (its socket closed) is taken over by a new
// attach process: RECONFIGURE with a new socket, and IO that waited goes
// on.
func TestKernelNBDTakeover(t *testing.T) {
	needKernelNBD(t)
	conn, err := kernelnbd.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	server, kernel, err := socketPairFDs()
	if err != nil {
		t.Fatal(err)
	}
	backend := "cairn-csi/kernel-takeover-test/" + time.Now().Format("150405")
	idx, err := conn.Connect(kernelnbd.Config{Index: kernelnbd.Any, Sockets: []int{kernel}, Size: 16 * mib, BlockSize: 512,
		ServerFlags: 0x6d, DeadConnTimeout: time.Minute, BackendID: backend})
	unix.Close(kernel)
	if err != nil {
		unix.Close(server)
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Disconnect(idx) })
	// The server dies without answering anything.
	unix.Close(server)
	time.Sleep(500 * time.Millisecond)
	dead := recordFor(t, kernelnbd.DevicePath(idx), backend)
	if err := dead.Reattachable(); err != nil {
		t.Fatalf("a device with a dead connection: %v", err)
	}
	dev := blockdevtest.New(16 * mib)
	want := bytes.Repeat([]byte{0xc3}, 4096)
	if _, err := dev.WriteAt(context.Background(), want, 4096); err != nil {
		t.Fatal(err)
	}
	rec, stop, _ := serveSpec(t, attach.Spec{Volume: "kernel-takeover-test", Node: "n", Attach: attach.AttachNBD,
		ReattachTimeout: time.Minute, Takeover: attach.TakeoverOf(dead)}, dev)
	if rec.Device != dead.Device {
		t.Fatalf("took over %s, not %s", rec.Device, dead.Device)
	}
	got := make([]byte, 4096)
	f, err := os.Open(rec.Device)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(got, 4096)
	f.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read through the taken-over device: %v", err)
	}
	if st := kernelnbd.StateOf(idx); st.HasBackend {
		// The kernel itself refuses another attachment's name.
		err := conn.Reconfigure(kernelnbd.Config{Index: idx, BackendID: backend + "-other"})
		if err == nil || !strings.Contains(err.Error(), "invalid argument") {
			t.Fatalf("RECONFIGURE with another backend name: %v", err)
		}
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}
