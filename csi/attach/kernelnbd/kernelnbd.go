// Package kernelnbd configures the Linux kernel's NBD driver (the nbd module, /dev/nbdN) through
// its generic netlink family "nbd", as rbd-nbd and curve-nbd do: NBD_CMD_CONNECT hands the kernel
// one end of a connected socket whose other end an NBD server serves in the transmission phase
// only (the kernel never negotiates), with the size, block size and transmission flags that server
// would have sent; NBD_CMD_RECONFIGURE gives a device whose server went away a new socket, or a new
// size; NBD_CMD_DISCONNECT ends it; NBD_CMD_STATUS lists devices.
//
// The netlink family exists only while the module is loaded (or built in), and only in the initial
// network namespace (a container needs the host's network); every command needs CAP_SYS_ADMIN.
// Everything here that needs the kernel is exercised only where the module is loaded; the message
// layout is tested byte for byte against the kernel's header (netlink_test.go).
package kernelnbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotLoaded is returned by Open when the kernel has no "nbd" generic netlink family: the nbd
// module is not loaded (or this process is not in the host's network namespace).
var ErrNotLoaded = errors.New("kernelnbd: the kernel has no \"nbd\" generic netlink family: the nbd module is not loaded")

// Loaded reports whether the nbd module is loaded or built in: /sys/module/nbd or /dev/nbd0 exists.
func Loaded() bool {
	for _, p := range []string{"/sys/module/nbd", "/dev/nbd0"} {
		if _, err := os.Stat(p); err == nil {
			return true
		}
	}
	return false
}

// Any is the Config.Index that lets the kernel choose a free device (creating one if none is free).
const Any = -1

// Config configures a device.
type Config struct {
	// Index is the device, N of /dev/nbdN; Any (CONNECT only) lets the kernel choose.
	Index int
	// Sockets are the connected sockets (file descriptors) the kernel speaks NBD on, one per
	// connection; the kernel takes its own reference: the caller closes its descriptors after the
	// call. RECONFIGURE replaces dead connections with them.
	Sockets []int
	// Size is the device's size in bytes (CONNECT: required; RECONFIGURE: 0 leaves it).
	Size uint64
	// BlockSize is the logical block size: a power of two from 512 to the page size. 0: not sent
	// (CONNECT: 1024; RECONFIGURE: unchanged).
	BlockSize uint64
	// ServerFlags are the transmission flags (NBD_FLAG_*) the server serves the device with
	// (CONNECT only).
	ServerFlags uint64
	// ClientFlags are NBD_CFLAG_* (ClientFlagDestroyOnDisconnect, ...); sent when not zero.
	ClientFlags uint64
	// Timeout fails a request not answered in this long (whole seconds). 0: not sent, and a
	// device never configured with one never times requests out (the kernel only logs them).
	Timeout time.Duration
	// DeadConnTimeout is how long requests wait for a dead connection to be replaced (by
	// RECONFIGURE with a new socket) before they fail (whole seconds). 0: not sent (they fail at
	// once).
	DeadConnTimeout time.Duration
	// BackendID names the device's server, shown in /sys/block/nbdN/backend (Linux 5.14 and
	// later; older kernels ignore it). A kernel that has one for the device refuses a RECONFIGURE
	// that does not name the same (EINVAL, "backend image doesn't match"): the check that a new
	// server takes over the device of the server before it, not another's. "": not sent.
	BackendID string
}

func seconds(d time.Duration) uint64 { return uint64((d + time.Second - 1) / time.Second) }

// encode builds the request of cmd (CONNECT or RECONFIGURE) from c.
func (c Config) encode(family uint16, seq uint32, cmd uint8) []byte {
	m := newMessage(family, seq, cmd, familyVersion)
	if c.Index >= 0 {
		m.u32(attrIndex, uint32(c.Index))
	}
	if c.Size > 0 {
		m.u64(attrSizeBytes, c.Size)
	}
	if c.BlockSize > 0 {
		m.u64(attrBlockSizeBytes, c.BlockSize)
	}
	if c.Timeout > 0 {
		m.u64(attrTimeout, seconds(c.Timeout))
	}
	if cmd == cmdConnect {
		m.u64(attrServerFlags, c.ServerFlags)
	}
	if c.ClientFlags != 0 {
		m.u64(attrClientFlags, c.ClientFlags)
	}
	if len(c.Sockets) > 0 {
		var items [][]byte
		for _, fd := range c.Sockets {
			items = append(items, appendAttr(nil, sockItem|unix.NLA_F_NESTED,
				appendAttr(nil, sockFD, binary.NativeEndian.AppendUint32(nil, uint32(fd)))))
		}
		m.attr(attrSockets|unix.NLA_F_NESTED, nested(items...))
	}
	if c.DeadConnTimeout > 0 {
		m.u64(attrDeadConnTimeout, seconds(c.DeadConnTimeout))
	}
	if c.BackendID != "" {
		m.str(attrBackendIdentifier, c.BackendID)
	}
	return m.bytes()
}

// encodeIndex builds a request that names only a device (DISCONNECT, STATUS; STATUS of all
// devices when index is Any).
func encodeIndex(family uint16, seq uint32, cmd uint8, index int) []byte {
	m := newMessage(family, seq, cmd, familyVersion)
	if index >= 0 {
		m.u32(attrIndex, uint32(index))
	}
	return m.bytes()
}

// connectReplyIndex finds the device index in the kernel's answer to CONNECT (nbd_connect_reply:
// a message of the nbd family with NBD_ATTR_INDEX).
func connectReplyIndex(msgs [][]byte) (int, error) {
	for _, m := range msgs {
		if len(m) < genlHdrLen {
			continue
		}
		a, err := parseAttrs(m[genlHdrLen:])
		if err != nil {
			return 0, fmt.Errorf("CONNECT reply: %w", err)
		}
		if idx, ok := a.u32(attrIndex); ok {
			return int(idx), nil
		}
	}
	return 0, errors.New("the kernel's answer to CONNECT names no device (no NBD_ATTR_INDEX)")
}

// Device is one entry of a STATUS answer.
type Device struct {
	Index     int
	Connected bool
}

// parseStatus reads the NBD_ATTR_DEVICE_LIST of the kernel's answers to STATUS.
func parseStatus(msgs [][]byte) ([]Device, error) {
	var out []Device
	for _, m := range msgs {
		if len(m) < genlHdrLen {
			continue
		}
		a, err := parseAttrs(m[genlHdrLen:])
		if err != nil {
			return nil, fmt.Errorf("STATUS reply: %w", err)
		}
		err = each(a[attrDeviceList], func(typ uint16, data []byte) error {
			if typ != deviceItem {
				return nil
			}
			item, err := parseAttrs(data)
			if err != nil {
				return err
			}
			idx, ok := item.u32(deviceIndex)
			if !ok {
				return errors.New("device item without NBD_DEVICE_INDEX")
			}
			d := Device{Index: int(idx)}
			if c, ok := item[deviceConnected]; ok && len(c) > 0 {
				d.Connected = c[0] != 0
			}
			out = append(out, d)
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("STATUS reply: %w", err)
		}
	}
	return out, nil
}

// Conn is a generic netlink socket talking to the nbd family. Its methods are safe for concurrent
// use (one request at a time).
type Conn struct {
	mu     sync.Mutex
	fd     int
	family uint16
	seq    uint32
}

// replyTimeout bounds the wait for the kernel's answer to one request.
const replyTimeout = 60 * time.Second

// Open opens a generic netlink socket and finds the nbd family: ErrNotLoaded when there is none.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("kernelnbd: generic netlink socket: %w", err)
	}
	c := &Conn{fd: fd, seq: uint32(time.Now().UnixNano())}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		c.Close()
		return nil, fmt.Errorf("kernelnbd: bind the netlink socket: %w", err)
	}
	// Errors with the kernel's message, without the request echoed back (both since Linux 4.12;
	// without them errors carry only the errno).
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	tv := unix.NsecToTimeval(replyTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		c.Close()
		return nil, fmt.Errorf("kernelnbd: netlink socket timeout: %w", err)
	}
	family, err := c.resolve(familyName)
	if errors.Is(err, unix.ENOENT) {
		c.Close()
		return nil, ErrNotLoaded
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	c.family = family
	return c, nil
}

// Close closes the socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// resolve asks the generic netlink controller for a family's id (CTRL_CMD_GETFAMILY).
func (c *Conn) resolve(name string) (uint16, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	m := newMessage(unix.GENL_ID_CTRL, c.seq, unix.CTRL_CMD_GETFAMILY, 1)
	m.str(unix.CTRL_ATTR_FAMILY_NAME, name)
	msgs, err := c.roundTrip(m.bytes(), c.seq, unix.GENL_ID_CTRL)
	if err != nil {
		return 0, fmt.Errorf("kernelnbd: find the generic netlink family %q: %w", name, err)
	}
	return familyID(msgs)
}

// familyID reads CTRL_ATTR_FAMILY_ID from the controller's answer.
func familyID(msgs [][]byte) (uint16, error) {
	for _, m := range msgs {
		if len(m) < genlHdrLen {
			continue
		}
		a, err := parseAttrs(m[genlHdrLen:])
		if err != nil {
			return 0, fmt.Errorf("kernelnbd: CTRL_CMD_GETFAMILY reply: %w", err)
		}
		if id, ok := a.u16(unix.CTRL_ATTR_FAMILY_ID); ok {
			return id, nil
		}
	}
	return 0, errors.New("kernelnbd: CTRL_CMD_GETFAMILY reply without CTRL_ATTR_FAMILY_ID")
}

// request sends one request of the nbd family and returns the payloads of the messages of the
// family that answered it (after the netlink header), once the kernel acknowledged it.
func (c *Conn) request(build func(seq uint32) []byte) ([][]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	return c.roundTrip(build(c.seq), c.seq, c.family)
}

// roundTrip sends req and reads until the acknowledgement (or error) of seq.
func (c *Conn) roundTrip(req []byte, seq uint32, family uint16) ([][]byte, error) {
	if err := unix.Sendto(c.fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	buf := make([]byte, 64<<10)
	var out [][]byte
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return nil, fmt.Errorf("no answer from the kernel in %s", replyTimeout)
		}
		if err != nil {
			return nil, fmt.Errorf("receive: %w", err)
		}
		msgs, err := parseReplies(buf[:n])
		if err != nil {
			return nil, err
		}
		for _, r := range msgs {
			if r.seq != seq {
				continue // an answer to an earlier request that gave up
			}
			switch r.typ {
			case unix.NLMSG_ERROR:
				if err := ackError(r); err != nil {
					return nil, err
				}
				return out, nil
			case unix.NLMSG_DONE:
				return out, nil
			case family:
				out = append(out, append([]byte(nil), r.data...))
			}
		}
	}
}

// Connect configures a device (Config.Index, or a free one with Any) and returns its index.
func (c *Conn) Connect(cfg Config) (int, error) {
	if len(cfg.Sockets) == 0 || cfg.Size == 0 {
		return 0, errors.New("kernelnbd: CONNECT needs a socket and a size")
	}
	msgs, err := c.request(func(seq uint32) []byte { return cfg.encode(c.family, seq, cmdConnect) })
	if err != nil {
		return 0, fmt.Errorf("kernelnbd: NBD_CMD_CONNECT%s: %w", onDevice(cfg.Index), explain(err))
	}
	idx, err := connectReplyIndex(msgs)
	if err != nil {
		return 0, fmt.Errorf("kernelnbd: %w", err)
	}
	return idx, nil
}

// Reconfigure changes a configured device: new sockets replace dead connections (one each; the
// kernel ignores sockets beyond the dead connections), a new size grows it (Linux 5.3 and later;
// older kernels ignore the size: compare /sys/block/nbdN/size), timeouts change.
func (c *Conn) Reconfigure(cfg Config) error {
	if cfg.Index < 0 {
		return errors.New("kernelnbd: RECONFIGURE needs a device index")
	}
	if _, err := c.request(func(seq uint32) []byte { return cfg.encode(c.family, seq, cmdReconfigure) }); err != nil {
		return fmt.Errorf("kernelnbd: NBD_CMD_RECONFIGURE%s: %w", onDevice(cfg.Index), explain(err))
	}
	return nil
}

// Disconnect disconnects a device: the kernel sends NBD_CMD_DISC on its connections, shuts its
// sockets down and fails the requests still queued. A device that is not configured is left as
// it is.
func (c *Conn) Disconnect(index int) error {
	if _, err := c.request(func(seq uint32) []byte { return encodeIndex(c.family, seq, cmdDisconnect, index) }); err != nil {
		return fmt.Errorf("kernelnbd: NBD_CMD_DISCONNECT%s: %w", onDevice(index), explain(err))
	}
	return nil
}

// Status lists a device (or all, with Any) and whether it is connected.
func (c *Conn) Status(index int) ([]Device, error) {
	msgs, err := c.request(func(seq uint32) []byte { return encodeIndex(c.family, seq, cmdStatus, index) })
	if err != nil {
		return nil, fmt.Errorf("kernelnbd: NBD_CMD_STATUS%s: %w", onDevice(index), explain(err))
	}
	return parseStatus(msgs)
}

func onDevice(index int) string {
	if index < 0 {
		return ""
	}
	return " of " + DevicePath(index)
}

// explain adds what the kernel's bare errnos mean for these commands (it logs the reason to the
// kernel log, not to the caller).
func explain(err error) error {
	switch {
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w (the nbd commands need CAP_SYS_ADMIN)", err)
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w (the device is in use by another server)", err)
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%w (see the kernel log: dmesg | grep nbd)", err)
	}
	return err
}

// DevicePath is /dev/nbdN.
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// IndexOf is N of /dev/nbdN.
func IndexOf(path string) (int, error) {
	n, ok := strings.CutPrefix(path, "/dev/nbd")
	if i, err := strconv.Atoi(n); ok && err == nil && i >= 0 {
		return i, nil
	}
	return 0, fmt.Errorf("kernelnbd: %q is not an nbd device (/dev/nbdN)", path)
}

// State is what sysfs tells of a device.
type State struct {
	// Connected: the device is configured (it has a pid file; a device whose connections died
	// and wait for a new socket still is).
	Connected bool
	// Backend is the device's NBD_ATTR_BACKEND_IDENTIFIER; HasBackend is false on kernels
	// without it (before 5.14) or when none was given.
	Backend    string
	HasBackend bool
	// Size is the device's size in bytes.
	Size int64
}

// sysBlock is where sysfs lists block devices (a variable for tests).
var sysBlock = "/sys/block"

// StateOf reads a device's state from sysfs.
func StateOf(index int) State {
	dir := filepath.Join(sysBlock, "nbd"+strconv.Itoa(index))
	var st State
	if _, err := os.Stat(filepath.Join(dir, "pid")); err == nil {
		st.Connected = true
	}
	if b, err := os.ReadFile(filepath.Join(dir, "backend")); err == nil {
		st.Backend, st.HasBackend = strings.TrimSpace(string(b)), true
	}
	if b, err := os.ReadFile(filepath.Join(dir, "size")); err == nil {
		if sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil {
			st.Size = sectors * 512 // sysfs counts 512-byte sectors whatever the block size
		}
	}
	return st
}

// EnsureNode makes sure /dev/nbdN exists (devtmpfs creates it; a /dev that is not devtmpfs gets
// it from the device number sysfs shows) and returns its path.
func EnsureNode(index int) (string, error) {
	path := DevicePath(index)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return path, nil
		}
		b, err := os.ReadFile(filepath.Join(sysBlock, "nbd"+strconv.Itoa(index), "dev"))
		if err == nil {
			var major, minor uint32
			if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &major, &minor); err != nil {
				return "", fmt.Errorf("kernelnbd: device number of nbd%d %q: %w", index, b, err)
			}
			err := unix.Mknod(path, unix.S_IFBLK|0o660, int(unix.Mkdev(major, minor)))
			if err == nil || errors.Is(err, unix.EEXIST) {
				return path, nil
			}
			return "", fmt.Errorf("kernelnbd: create %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("kernelnbd: %s did not appear: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
