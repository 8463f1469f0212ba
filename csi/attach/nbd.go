package attach

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/csi/attach/kernelnbd"
	"cairn.io/cairn/nbd"
)

// The nbd attach: the attach process serves the volume with Cairn's NBD
// server (package nbd, transmission phase only) on one end of a socket
// pair and hands the other end to the kernel's nbd driver through netlink
// (NBD_CMD_CONNECT, as rbd-nbd and curve-nbd do), which makes /dev/nbdN of
// it. The device is the kernel's: it outlives the attach process. When
// the process dies (its container restarted) the kernel holds the
// device's IO for Spec.ReattachTimeout; a new attach process takes the
// device over with NBD_CMD_RECONFIGURE and a new socket (Spec.Takeover),
// and the IO goes on. Requests the dead process had not answered are sent
// again by the kernel once their block-layer timer (30 s) finds them on a
// replaced connection.

// Takeover names the device of an attach process that is gone: an nbd
// device, or the session of an iscsi attach.
type Takeover struct {
	// Device (nbd) is /dev/nbdN.
	Device string
	// Backend (nbd) is the name the device was configured with
	// (Record.Backend).
	Backend string
	// Target (iscsi) is the session's target (Record.Target); the portal
	// and the secrets are read from the record.
	Target string
}

// DefaultReattachTimeout is Spec.ReattachTimeout when it is zero.
const DefaultReattachTimeout = 2 * time.Minute

// nbdKernel is the kernel's nbd driver as the attach uses it: the netlink
// family and sysfs (a fake in tests, where the kernel has no nbd module).
type nbdKernel interface {
	Connect(kernelnbd.Config) (int, error)
	Reconfigure(kernelnbd.Config) error
	Disconnect(index int) error
	State(index int) kernelnbd.State
	// Node makes sure the device node exists and returns its path.
	Node(index int) (string, error)
	Close() error
}

// openNBDKernel opens the netlink family; a variable for tests.
var openNBDKernel = func() (nbdKernel, error) {
	c, err := kernelnbd.Open()
	if err != nil {
		return nil, err
	}
	return realKernel{c}, nil
}

type realKernel struct{ *kernelnbd.Conn }

func (realKernel) State(index int) kernelnbd.State { return kernelnbd.StateOf(index) }
func (realKernel) Node(index int) (string, error)  { return kernelnbd.EnsureNode(index) }

// bootID identifies this boot of the kernel.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// newBackendID names a new nbd attachment to the kernel: the volume and a
// random suffix, so that a device another attachment of the same volume
// configured later is not mistaken for this one.
func newBackendID(volume string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "cairn-csi/" + volume + "/" + hex.EncodeToString(b[:])
}

// socketPair returns a connected AF_UNIX stream socket pair: the server's
// end as a net.Conn, the kernel's as a descriptor.
func socketPair() (net.Conn, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("socket pair: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-server")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		unix.Close(fds[1])
		return nil, -1, fmt.Errorf("socket pair: %w", err)
	}
	return c, fds[1], nil
}

// oneExport is the catalog of the attach process's NBD server: the volume,
// which the server must not close (the process owns it).
type oneExport struct {
	name string
	dev  blockdev.Device
}

func (e oneExport) List(context.Context) ([]string, error) { return []string{e.name}, nil }

func (e oneExport) Open(_ context.Context, name string) (blockdev.Device, error) {
	if name != e.name {
		return nil, fmt.Errorf("export %q: %w", name, blockdev.ErrNotFound)
	}
	return keepOpen{e.dev}, nil
}

// keepOpen is a Device whose Close leaves the device open.
type keepOpen struct{ blockdev.Device }

func (keepOpen) Close() error     { return nil }
func (k keepOpen) ReadOnly() bool { return blockdev.IsReadOnly(k.Device) }

// nbdAttach is one attach process's nbd device.
type nbdAttach struct {
	spec    Spec
	dev     blockdev.Device
	kernel  nbdKernel
	srv     *nbd.Server
	log     *slog.Logger
	index   int
	backend string
	served  chan error // the current connection's ServeTransmission
}

// serveNBD is Serve for the nbd attach.
func serveNBD(ctx context.Context, spec Spec, dev blockdev.Device, ready io.Writer, log *slog.Logger) error {
	sector, err := sectorOf(dev)
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	if spec.ReattachTimeout <= 0 {
		spec.ReattachTimeout = DefaultReattachTimeout
	}
	kernel, err := openNBDKernel()
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	defer kernel.Close()
	srv, err := nbd.NewServer(nbd.Config{Exports: oneExport{spec.Volume, dev}, Logger: log})
	if err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	defer srv.Close()
	a := &nbdAttach{spec: spec, dev: dev, kernel: kernel, srv: srv, log: log}
	if err := a.connect(sector); err != nil {
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	// Failing from here on, a device this process configured is
	// disconnected; one it took over is left to the next takeover (file
	// systems on it hold their IO until then).
	abandon := func(err error) error {
		if spec.Takeover == nil {
			_ = kernel.Disconnect(a.index)
		}
		return fmt.Errorf("attach %s: %w", spec.Volume, err)
	}
	path, err := kernel.Node(a.index)
	if err != nil {
		return abandon(err)
	}
	rec := Record{Spec: spec, Pid: os.Getpid(), Device: path, Backend: a.backend, BootID: bootID(), StartedUnix: time.Now().Unix()}
	rec.Takeover = nil
	ctl, err := serveControl(spec.Dir, rec, dev, sector, a.resize, log)
	if err != nil {
		return abandon(err)
	}
	defer ctl.Close()
	if err := announce(rec, ready, log); err != nil {
		return abandon(err)
	}
	for {
		select {
		case <-ctx.Done():
			waitReleased(path, log)
			return a.disconnect(path)
		case err := <-a.served:
			// The connection ended under a device still configured: the
			// server broke it (a reply it could not send). The kernel holds
			// the IO for the reattach timeout: connect it again.
			if st := kernel.State(a.index); !st.Connected || (st.HasBackend && st.Backend != a.backend) {
				return fmt.Errorf("attach %s: %s was disconnected (%v)", spec.Volume, path, err)
			}
			log.Warn("the device's connection ended; connecting it again", "device", path, "err", err)
			if err := a.reconnect(); err != nil {
				return fmt.Errorf("attach %s: connect %s again: %w", spec.Volume, path, err)
			}
		}
	}
}

// serve starts serving the server's end of a new socket pair and returns
// the kernel's end.
func (a *nbdAttach) serve() (int, error) {
	conn, fd, err := socketPair()
	if err != nil {
		return -1, err
	}
	served := make(chan error, 1)
	go func() { served <- a.srv.ServeTransmission(conn, a.spec.Volume) }()
	a.served = served
	return fd, nil
}

// connect configures a free device, or takes over the device of the
// attach process before this one.
func (a *nbdAttach) connect(sector int64) error {
	fd, err := a.serve()
	if err != nil {
		return err
	}
	size := uint64(a.dev.Size() - a.dev.Size()%sector)
	if t := a.spec.Takeover; t != nil {
		if a.index, err = kernelnbd.IndexOf(t.Device); err != nil {
			unix.Close(fd)
			return err
		}
		a.backend = t.Backend
		return a.takeOver(fd, size)
	}
	a.backend = newBackendID(a.spec.Volume)
	a.index, err = a.kernel.Connect(kernelnbd.Config{
		Index: kernelnbd.Any, Sockets: []int{fd}, Size: size, BlockSize: uint64(sector),
		ServerFlags: uint64(a.srv.TransmissionFlags(a.dev)), DeadConnTimeout: a.spec.ReattachTimeout, BackendID: a.backend,
	})
	unix.Close(fd) // the kernel holds its own reference
	return err
}

// reconnect gives the device a new socket in place of its dead connection.
func (a *nbdAttach) reconnect() error {
	fd, err := a.serve()
	if err != nil {
		return err
	}
	return a.takeOver(fd, 0)
}

// takeOverGrace is how long a connection handed over with RECONFIGURE must
// stay open to count as taken: the kernel drops a socket it has no dead
// connection to put in place of (and answers success).
const takeOverGrace = 300 * time.Millisecond

// takeOver hands the kernel the socket fd in place of the device's dead
// connection (with the volume's size, when not 0).
func (a *nbdAttach) takeOver(fd int, size uint64) error {
	st := a.kernel.State(a.index)
	switch {
	case !st.Connected:
		unix.Close(fd)
		return fmt.Errorf("%s is not configured any more: nothing to take over", kernelnbd.DevicePath(a.index))
	case st.HasBackend && st.Backend != a.backend:
		unix.Close(fd)
		return fmt.Errorf("%s serves another attachment (%s), not %s", kernelnbd.DevicePath(a.index), st.Backend, a.backend)
	}
	err := a.kernel.Reconfigure(kernelnbd.Config{Index: a.index, Sockets: []int{fd}, Size: size,
		DeadConnTimeout: a.spec.ReattachTimeout, BackendID: a.backend})
	unix.Close(fd)
	if err != nil {
		return err
	}
	select {
	case err := <-a.served:
		return fmt.Errorf("the kernel did not take the new connection of %s (%v): it has no dead connection to replace; is another process serving it?",
			kernelnbd.DevicePath(a.index), err)
	case <-time.After(takeOverGrace):
	}
	a.log.Info("took over the nbd device", "device", kernelnbd.DevicePath(a.index))
	return nil
}

// resize grows the device to the volume's size (the control socket's
// resize, after the volume learned its size).
func (a *nbdAttach) resize(context.Context) error {
	sector, _ := sectorOf(a.dev)
	size := a.dev.Size() - a.dev.Size()%sector
	if err := a.kernel.Reconfigure(kernelnbd.Config{Index: a.index, Size: uint64(size), BackendID: a.backend}); err != nil {
		return err
	}
	if got := a.kernel.State(a.index).Size; got < size {
		return fmt.Errorf("the kernel kept %s at %d bytes, not the volume's %d: growing an nbd device with NBD_CMD_RECONFIGURE needs Linux 5.3 or later; unstage and stage the volume again",
			kernelnbd.DevicePath(a.index), got, size)
	}
	return nil
}

// disconnectWait bounds the wait for the connection to end after
// NBD_CMD_DISCONNECT.
const disconnectWait = 30 * time.Second

// disconnect disconnects the device and waits for the kernel to end its
// connection (it sends NBD_CMD_DISC once the requests in flight are
// answered, then shuts the socket down).
func (a *nbdAttach) disconnect(path string) error {
	a.log.Info("disconnecting", "volume", a.spec.Volume, "device", path)
	if err := a.kernel.Disconnect(a.index); err != nil {
		return err
	}
	select {
	case err := <-a.served:
		if err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			a.log.Info("the device's connection ended", "err", err)
		}
	case <-time.After(disconnectWait):
		a.log.Warn("the kernel did not end the device's connection after NBD_CMD_DISCONNECT; closing it", "device", path)
	}
	return nil
}

// Reattachable says why a new attach process cannot take over the device
// of this attachment, whose process is gone (nil: it can). Only a device
// the kernel holds can be taken over, in the boot that configured it:
// an nbd device the kernel still has configured for this attachment, or
// the kernel's session of an iscsi attachment.
func (r *Record) Reattachable() error {
	switch r.mode() {
	case AttachNBD:
		return r.reattachableNBD()
	case AttachISCSI:
		return r.reattachableISCSI()
	}
	return fmt.Errorf("a %s attachment cannot be taken over: its device died with its attach process", r.mode())
}

// OutlivesProcess reports whether the attachment's device is the kernel's,
// which outlives the attach process (nbd, iscsi): a new attach process
// may take it over (Reattachable).
func (r *Record) OutlivesProcess() bool {
	return r.mode() == AttachNBD || r.mode() == AttachISCSI
}

// reattachableNBD is Reattachable for the nbd attach.
func (r *Record) reattachableNBD() error {
	if r.BootID == "" || r.BootID != bootID() {
		return errors.New("the machine restarted since the device was configured")
	}
	index, err := kernelnbd.IndexOf(r.Device)
	if err != nil {
		return err
	}
	k, err := openNBDKernel()
	if err != nil {
		return err
	}
	defer k.Close()
	st := k.State(index)
	switch {
	case !st.Connected:
		return fmt.Errorf("%s is not configured any more", r.Device)
	case st.HasBackend && st.Backend != r.Backend:
		return fmt.Errorf("%s serves another attachment now (%s)", r.Device, st.Backend)
	}
	return nil
}

// TakeoverOf names the device of r for a new attach process.
func TakeoverOf(r *Record) *Takeover {
	if r.mode() == AttachISCSI {
		return &Takeover{Device: r.Device, Target: r.Target}
	}
	return &Takeover{Device: r.Device, Backend: r.Backend}
}

// cleanupNBD disconnects the device of an nbd attachment whose process was
// killed, if the kernel still has it configured for this attachment.
func (r *Record) cleanupNBD() error {
	if r.BootID == "" || r.BootID != bootID() {
		return nil // another boot's device number
	}
	index, err := kernelnbd.IndexOf(r.Device)
	if err != nil {
		return nil
	}
	k, err := openNBDKernel()
	if errors.Is(err, kernelnbd.ErrNotLoaded) {
		return nil
	}
	if err != nil {
		return err
	}
	defer k.Close()
	if st := k.State(index); !st.Connected || (st.HasBackend && st.Backend != r.Backend) {
		return nil
	}
	return k.Disconnect(index)
}
