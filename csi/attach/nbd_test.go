package attach_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/csi/attach/kernelnbd"
	"cairn.io/cairn/internal/testlog"
)

// This machine's kernel has no nbd module: these tests stand a fake kernel
// in for it. The fake keeps the devices the attach configures through
// "netlink" and speaks the kernel's side of the transmission phase on the
// socket it is handed, byte for byte as drivers/block/nbd.c does (struct
// nbd_request out, struct nbd_reply in). TestKernelNBDAttach runs the
// same against the real driver where it is loaded (CAIRN_KERNEL_NBD=1).

// fakeKernel plays the kernel's nbd driver.
type fakeKernel struct {
	t *testing.T

	mu          sync.Mutex
	devs        map[int]*fakeNBD
	next        int
	ignoreSize  bool // a kernel before 5.3: RECONFIGURE does not change the size
	connects    []kernelnbd.Config
	reconfigs   []kernelnbd.Config
	disconnects []int
}

// fakeNBD is one device of the fake kernel.
type fakeNBD struct {
	index     int
	connected bool
	backend   string
	size      uint64
	flags     uint64
	blockSize uint64

	mu     sync.Mutex // one request at a time
	conn   net.Conn   // the kernel's end of the current connection; nil when dead
	r      *bufio.Reader
	handle uint64
}

func newFakeKernel(t *testing.T) *fakeKernel {
	k := &fakeKernel{t: t, devs: map[int]*fakeNBD{}, next: 900} // numbers no real device has
	t.Cleanup(attach.SetNBDKernel(func() (attach.NBDKernel, error) { return k, nil }))
	return k
}

// take keeps a socket the way the kernel does: its own reference to it.
func (k *fakeKernel) take(fd int) net.Conn {
	nfd, err := unix.Dup(fd)
	if err != nil {
		k.t.Error(err)
		return nil
	}
	f := os.NewFile(uintptr(nfd), "kernel")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		k.t.Error(err)
		return nil
	}
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	k.t.Cleanup(func() { c.Close() })
	return c
}

func (k *fakeKernel) Connect(cfg kernelnbd.Config) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.connects = append(k.connects, cfg)
	if cfg.Index != kernelnbd.Any || len(cfg.Sockets) != 1 || cfg.Size == 0 {
		return 0, fmt.Errorf("fake kernel: CONNECT %+v: %w", cfg, syscall.EINVAL)
	}
	d := &fakeNBD{index: k.next, connected: true, backend: cfg.BackendID, size: cfg.Size, flags: cfg.ServerFlags, blockSize: cfg.BlockSize}
	d.conn = k.take(cfg.Sockets[0])
	d.r = bufio.NewReader(d.conn)
	k.devs[d.index] = d
	k.next++
	return d.index, nil
}

func (k *fakeKernel) Reconfigure(cfg kernelnbd.Config) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reconfigs = append(k.reconfigs, cfg)
	d := k.devs[cfg.Index]
	switch {
	case d == nil || !d.connected:
		return fmt.Errorf("fake kernel: nbd%d not configured: %w", cfg.Index, syscall.EINVAL)
	case d.backend != "" && cfg.BackendID != d.backend:
		return fmt.Errorf("fake kernel: backend image doesn't match with %s: %w", d.backend, syscall.EINVAL)
	}
	if cfg.Size > 0 && !k.ignoreSize {
		d.size = cfg.Size
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, fd := range cfg.Sockets {
		// Only a dead connection is replaced; other sockets are dropped.
		if d.conn == nil {
			d.conn = k.take(fd)
			d.r = bufio.NewReader(d.conn)
		}
	}
	return nil
}

func (k *fakeKernel) Disconnect(index int) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.disconnects = append(k.disconnects, index)
	d := k.devs[index]
	if d == nil || !d.connected {
		return nil
	}
	d.connected = false
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn != nil {
		// NBD_CMD_DISC, then the socket is shut down.
		_, _ = d.conn.Write(request(2, 0, 0, 0, 0))
		d.conn.Close()
		d.conn = nil
	}
	return nil
}

func (k *fakeKernel) State(index int) kernelnbd.State {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[index]
	if d == nil {
		return kernelnbd.State{}
	}
	return kernelnbd.State{Connected: d.connected, Backend: d.backend, HasBackend: d.backend != "", Size: int64(d.size)}
}

func (k *fakeKernel) Node(index int) (string, error) { return kernelnbd.DevicePath(index), nil }
func (k *fakeKernel) Close() error                   { return nil }

// calls returns copies of the calls so far.
func (k *fakeKernel) calls() (connects, reconfigs []kernelnbd.Config, disconnects []int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]kernelnbd.Config(nil), k.connects...), append([]kernelnbd.Config(nil), k.reconfigs...), append([]int(nil), k.disconnects...)
}

func (k *fakeKernel) lastReconfigure() kernelnbd.Config {
	_, r, _ := k.calls()
	return r[len(r)-1]
}

func (k *fakeKernel) dev(index int) *fakeNBD {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.devs[index]
}

// breakConn closes the device's connection as a dead one (the kernel keeps
// the device configured and waits for a new socket).
func (d *fakeNBD) breakConn() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.conn.Close()
	d.conn = nil
}

// request is struct nbd_request.
func request(cmd, flags uint32, handle, from uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint32(b, flags<<16|cmd)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, from)
	return binary.BigEndian.AppendUint32(b, length)
}

// io sends one request as the kernel does and reads its simple reply (and
// a read's data).
func (d *fakeNBD) io(cmd, flags uint32, from uint64, length uint32, payload []byte) (errno uint32, data []byte, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn == nil {
		return 0, nil, errors.New("no live connection")
	}
	d.handle++
	if _, err := d.conn.Write(append(request(cmd, flags, d.handle, from, length), payload...)); err != nil {
		return 0, nil, err
	}
	var rep [16]byte
	if _, err := io.ReadFull(d.r, rep[:]); err != nil {
		return 0, nil, err
	}
	if m := binary.BigEndian.Uint32(rep[0:]); m != 0x67446698 {
		return 0, nil, fmt.Errorf("reply magic %#x", m)
	}
	if h := binary.BigEndian.Uint64(rep[8:]); h != d.handle {
		return 0, nil, fmt.Errorf("reply handle %#x, want %#x", h, d.handle)
	}
	errno = binary.BigEndian.Uint32(rep[4:])
	if cmd == 0 && errno == 0 {
		data = make([]byte, length)
		if _, err := io.ReadFull(d.r, data); err != nil {
			return 0, nil, err
		}
	}
	return errno, data, nil
}

func (d *fakeNBD) mustIO(t *testing.T, cmd, flags uint32, from uint64, length uint32, payload []byte) []byte {
	t.Helper()
	errno, data, err := d.io(cmd, flags, from, length, payload)
	if err != nil || errno != 0 {
		t.Fatalf("request %d at %d length %d: errno %d, %v", cmd, from, length, errno, err)
	}
	return data
}

func TestNBDAttachServesTheKernel(t *testing.T) {
	k := newFakeKernel(t)
	dev := blockdevtest.New(8 * mib)
	rec, stop, _ := serveSpec(t, attach.Spec{Volume: "pvc-1", Node: "n", Attach: attach.AttachNBD}, dev)

	// One CONNECT: any free device, the volume's size and block size, the
	// server's transmission flags, the reattach timeout, a backend name.
	connects, _, _ := k.calls()
	if len(connects) != 1 {
		t.Fatalf("%d CONNECTs", len(connects))
	}
	c := connects[0]
	if c.Size != 8*mib || c.BlockSize != 512 || c.ServerFlags != 0x6d || c.DeadConnTimeout != attach.DefaultReattachTimeout ||
		!strings.HasPrefix(c.BackendID, "cairn-csi/pvc-1/") || c.Timeout != 0 {
		t.Fatalf("CONNECT %+v", c)
	}
	d := k.dev(900)
	if rec.Device != "/dev/nbd900" || rec.Attach != attach.AttachNBD || rec.Backend != c.BackendID || rec.BootID == "" || rec.Pid != os.Getpid() {
		t.Fatalf("record %+v", rec)
	}
	if got, err := attach.ReadRecord(rec.Dir); err != nil || got.Device != rec.Device || got.Backend != rec.Backend {
		t.Fatalf("record on disk %+v, %v", got, err)
	}

	// The kernel's requests reach the volume.
	data := bytes.Repeat([]byte("cairn!!!"), 64<<10/8)
	d.mustIO(t, 1, 0, 2*mib, uint32(len(data)), data)
	if !bytes.Equal(dev.Contents(2*mib, int64(len(data))), data) {
		t.Fatal("the write did not reach the volume")
	}
	if got := d.mustIO(t, 0, 0, 2*mib, uint32(len(data)), nil); !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	flushes := dev.Count(blockdevtest.OpFlush)
	d.mustIO(t, 3, 0, 0, 0, nil)
	if dev.Count(blockdevtest.OpFlush) != flushes+1 {
		t.Fatal("a flush of the device did not flush the volume")
	}
	d.mustIO(t, 4, 0, 2*mib, 4096, nil)
	if dev.Count(blockdevtest.OpUnmap) != 1 || !bytes.Equal(dev.Contents(2*mib, 4096), make([]byte, 4096)) {
		t.Fatal("a discard did not unmap")
	}

	// The volume grows: the control socket reconfigures the device, and
	// the new range is served.
	if err := dev.Resize(16 * mib); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if size, err := rec.Resize(ctx); err != nil || size != 16*mib {
		t.Fatalf("resize: %d, %v", size, err)
	}
	if r := k.lastReconfigure(); r.Index != 900 || r.Size != 16*mib || r.BackendID != rec.Backend || len(r.Sockets) != 0 {
		t.Fatalf("RECONFIGURE %+v", r)
	}
	d.mustIO(t, 1, 0, 12*mib, 4096, bytes.Repeat([]byte{3}, 4096))
	if !bytes.Equal(dev.Contents(12*mib, 4096), bytes.Repeat([]byte{3}, 4096)) {
		t.Fatal("the write beyond the old size did not land")
	}
	// A kernel that ignores the new size (before Linux 5.3) is reported.
	k.mu.Lock()
	k.ignoreSize = true
	k.mu.Unlock()
	if err := dev.Resize(20 * mib); err != nil {
		t.Fatal(err)
	}
	if _, err := rec.Resize(ctx); err == nil || !strings.Contains(err.Error(), "Linux 5.3") {
		t.Fatalf("resize on a kernel that keeps the size: %v", err)
	}
	if st, err := rec.Status(ctx); err != nil || st.Error != "" || st.Device != rec.Device {
		t.Fatalf("status %+v, %v", st, err)
	}

	// The connection breaks under a configured device: the attach process
	// connects it again (RECONFIGURE with a new socket), and IO goes on.
	_, reconfigs, _ := k.calls()
	before := len(reconfigs)
	d.breakConn()
	deadline := time.Now().Add(30 * time.Second)
	for {
		d.mu.Lock()
		live := d.conn != nil
		d.mu.Unlock()
		if live {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the attach process did not connect the device again")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, reconfigs, _ := k.calls(); len(reconfigs) <= before {
		t.Fatal("no RECONFIGURE")
	} else if r := reconfigs[before]; len(r.Sockets) != 1 || r.BackendID != rec.Backend || r.DeadConnTimeout != attach.DefaultReattachTimeout {
		t.Fatalf("reconnecting RECONFIGURE %+v", r)
	}
	if got := d.mustIO(t, 0, 0, 12*mib, 4096, nil); !bytes.Equal(got, bytes.Repeat([]byte{3}, 4096)) {
		t.Fatal("read after reconnecting differs")
	}

	// Stopping disconnects the device (the kernel sends NBD_CMD_DISC) and
	// closes the volume.
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if _, _, disc := k.calls(); len(disc) != 1 || disc[0] != 900 || k.State(900).Connected {
		t.Fatalf("disconnects %v", disc)
	}
	if !dev.Closed() {
		t.Fatal("the volume was not closed")
	}
	// Nothing left to clean up.
	if err := rec.Cleanup(ctx); err != nil {
		t.Fatalf("cleanup after a clean stop: %v", err)
	}
	if _, _, disc := k.calls(); len(disc) != 1 {
		t.Fatalf("cleanup after a clean stop disconnected again: %v", disc)
	}
	if err := rec.Reattachable(); err == nil || !strings.Contains(err.Error(), "not configured") {
		t.Fatalf("a disconnected device reattachable: %v", err)
	}
}

func TestNBDAttachReadOnlyAndBlockSize(t *testing.T) {
	k := newFakeKernel(t)
	_, stop, _ := serveSpec(t, attach.Spec{Volume: "ro", Node: "n", Attach: attach.AttachNBD, ReadOnly: true,
		ReattachTimeout: 10 * time.Second}, readOnlyDev{sized{blockdevtest.New(4 * mib), 4096}})
	connects, _, _ := k.calls()
	c := connects[0]
	if c.ServerFlags != 0x6f || c.BlockSize != 4096 || c.DeadConnTimeout != 10*time.Second {
		t.Fatalf("CONNECT of a read-only volume with 4 KiB blocks: %+v", c)
	}
	if errno, _, err := k.dev(900).io(1, 0, 0, 4096, make([]byte, 4096)); err != nil || errno == 0 {
		t.Fatalf("a write to a read-only attach: errno %d, %v", errno, err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// readOnlyDev says it refuses writes (and does: blockdevtest would not).
type readOnlyDev struct{ sized }

func (readOnlyDev) ReadOnly() bool { return true }
func (readOnlyDev) WriteAt(context.Context, []byte, int64) (int, error) {
	return 0, syscall.EROFS
}

// A device whose attach process is gone is taken over by a new one, with
// the name the device was configured with; refused when the device is
// still served, gone, or another's.
func TestNBDTakeover(t *testing.T) {
	k := newFakeKernel(t)
	// A device served by a live attach process cannot be taken over: the
	// kernel has no dead connection to replace and drops the socket.
	live, stopLive, _ := serveSpec(t, attach.Spec{Volume: "pvc-t", Node: "n", Attach: attach.AttachNBD}, blockdevtest.New(mib))
	if err := live.Reattachable(); err != nil {
		t.Fatalf("a configured nbd device: %v", err)
	}
	err := serveOnce(t, attach.Spec{Volume: "pvc-t", Node: "n", Attach: attach.AttachNBD, Takeover: attach.TakeoverOf(live)}, blockdevtest.New(mib))
	if err == nil || !strings.Contains(err.Error(), "did not take the new connection") {
		t.Fatalf("takeover of a served device: %v", err)
	}
	if err := stopLive(); err != nil {
		t.Fatal(err)
	}
	// Disconnected: nothing to take over.
	if err := live.Reattachable(); err == nil || !strings.Contains(err.Error(), "not configured") {
		t.Fatalf("a disconnected device reattachable: %v", err)
	}
	err = serveOnce(t, attach.Spec{Volume: "pvc-t", Node: "n", Attach: attach.AttachNBD, Takeover: attach.TakeoverOf(live)}, blockdevtest.New(mib))
	if err == nil || !strings.Contains(err.Error(), "not configured") {
		t.Fatalf("takeover of a disconnected device: %v", err)
	}

	// What an attach process that died leaves: a configured device whose
	// connection is dead, and its record.
	dead := deadAttachment(t, k, "cairn-csi/pvc-t/0d0d", 8*mib)
	if err := dead.Reattachable(); err != nil {
		t.Fatalf("a configured device with a dead connection: %v", err)
	}
	// A new process takes it over, with the volume's current size.
	dev := blockdevtest.New(12 * mib)
	if _, err := dev.WriteAt(context.Background(), bytes.Repeat([]byte{1}, 4096), 8*mib); err != nil {
		t.Fatal(err)
	}
	taken, stopTaken, _ := serveSpec(t, attach.Spec{Volume: "pvc-t", Node: "n", Attach: attach.AttachNBD, Takeover: attach.TakeoverOf(dead)}, dev)
	idx, _ := kernelnbd.IndexOf(dead.Device)
	r := k.lastReconfigure()
	if r.Index != idx || len(r.Sockets) != 1 || r.Size != 12*mib || r.BackendID != dead.Backend || r.DeadConnTimeout != attach.DefaultReattachTimeout {
		t.Fatalf("takeover RECONFIGURE %+v", r)
	}
	if taken.Device != dead.Device || taken.Backend != dead.Backend || taken.Pid != os.Getpid() {
		t.Fatalf("record after the takeover %+v", taken)
	}
	if got := k.dev(idx).mustIO(t, 0, 0, 8*mib, 4096, nil); !bytes.Equal(got, bytes.Repeat([]byte{1}, 4096)) {
		t.Fatal("read through the taken-over device differs")
	}
	if err := stopTaken(); err != nil {
		t.Fatal(err)
	}
	if k.State(idx).Connected {
		t.Fatal("the taken-over device stayed configured after its stop")
	}

	// Another attachment's device (the kernel shows another name): refused.
	other := deadAttachment(t, k, "cairn-csi/pvc-o/0e0e", mib)
	stale := *other
	stale.Backend = "cairn-csi/pvc-t/0d0d"
	if err := stale.Reattachable(); err == nil || !strings.Contains(err.Error(), "another attachment") {
		t.Fatalf("another attachment's device reattachable: %v", err)
	}
	err = serveOnce(t, attach.Spec{Volume: "pvc-t", Node: "n", Attach: attach.AttachNBD, Takeover: attach.TakeoverOf(&stale)}, blockdevtest.New(mib))
	if err == nil || !strings.Contains(err.Error(), "another attachment") {
		t.Fatalf("takeover of another attachment's device: %v", err)
	}
	// Another boot's record, or a fuse one: never.
	otherBoot := *other
	otherBoot.BootID = "00000000-0000-0000-0000-000000000000"
	if err := otherBoot.Reattachable(); err == nil || !strings.Contains(err.Error(), "restarted") {
		t.Fatalf("another boot's device reattachable: %v", err)
	}
	fuse := *other
	fuse.Attach = ""
	if err := fuse.Reattachable(); err == nil {
		t.Fatal("a fuse attachment reattachable")
	}
}

// deadAttachment configures a device of the fake kernel as an attach
// process would, kills its connection as the process's death does, and
// returns the record the process left.
func deadAttachment(t *testing.T, k *fakeKernel, backend string, size uint64) *attach.Record {
	t.Helper()
	server, kernel, err := socketPairFDs()
	if err != nil {
		t.Fatal(err)
	}
	idx, err := k.Connect(kernelnbd.Config{Index: kernelnbd.Any, Sockets: []int{kernel}, Size: size, BackendID: backend})
	unix.Close(kernel)
	unix.Close(server)
	if err != nil {
		t.Fatal(err)
	}
	k.dev(idx).breakConn()
	return recordFor(t, kernelnbd.DevicePath(idx), backend)
}

// serveOnce runs Serve expecting it to fail before it is ready.
func serveOnce(t *testing.T, spec attach.Spec, dev *blockdevtest.Device) error {
	t.Helper()
	spec.Dir = t.TempDir()
	var out bytes.Buffer
	err := attach.Serve(context.Background(), spec, dev, &out, testlog.New(t))
	if out.Len() > 0 {
		t.Fatalf("Serve reported ready (%q) and returned %v", out.String(), err)
	}
	if !dev.Closed() {
		t.Fatal("Serve left the volume open")
	}
	return err
}

// The device of an attach process that was killed is disconnected by
// Cleanup while the kernel still has it configured for that attachment.
func TestNBDCleanupAfterAKill(t *testing.T) {
	k := newFakeKernel(t)
	rec := deadAttachment(t, k, "cairn-csi/pvc-k/01", mib)
	idx, _ := kernelnbd.IndexOf(rec.Device)
	// Another attachment's name: left alone.
	wrong := *rec
	wrong.Backend = "cairn-csi/pvc-k/02"
	if err := wrong.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, _, disc := k.calls(); len(disc) != 0 {
		t.Fatalf("cleanup of another attachment's device disconnected %v", disc)
	}
	if err := rec.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, _, disc := k.calls(); len(disc) != 1 || k.State(idx).Connected {
		t.Fatalf("cleanup: disconnects %v", disc)
	}
}

// recordFor reads back the record of an nbd attachment of this boot.
func recordFor(t *testing.T, device, backend string) *attach.Record {
	t.Helper()
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Skipf("no boot id: %v", err)
	}
	rec := &attach.Record{Spec: attach.Spec{Volume: "pvc-k", Attach: attach.AttachNBD, Dir: t.TempDir()}, Pid: 1 << 30,
		Device: device, Backend: backend, BootID: strings.TrimSpace(string(boot))}
	return rec
}

func socketPairFDs() (int, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	return fds[0], fds[1], nil
}
