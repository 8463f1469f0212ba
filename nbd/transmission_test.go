package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
)

// The kernel's nbd driver, configured through netlink, is handed one end of a socket pair and
// speaks only the transmission phase on it: requests as include/uapi/linux/nbd.h lays them out
// (struct nbd_request: magic 0x25609513, a 32-bit type whose upper 16 bits are the command flags,
// an 8-byte handle, a 64-bit offset, a 32-bit length) and simple replies (struct nbd_reply: magic
// 0x67446698, a 32-bit error, the handle). These tests play the kernel over a real AF_UNIX socket
// pair, byte for byte.

// socketPair returns the two ends of an AF_UNIX stream socket pair, as net.Conns.
func socketPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int, name string) net.Conn {
		f := os.NewFile(uintptr(fd), name)
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	server, client = conn(fds[0], "server"), conn(fds[1], "kernel")
	t.Cleanup(func() { server.Close(); client.Close() })
	_ = client.SetDeadline(time.Now().Add(60 * time.Second))
	return server, client
}

// transmissionEnv is a server with one in-memory export, "vol", served on a socket pair without a
// handshake; kernel is the client's end.
type transmissionEnv struct {
	srv    *Server
	dev    *blockdevtest.Device
	cat    *blockdevtest.Catalog
	kernel net.Conn
	r      *bufio.Reader
	served chan error
}

func newTransmissionEnv(t *testing.T, size int64) *transmissionEnv {
	t.Helper()
	cat := blockdevtest.NewCatalog()
	dev := blockdevtest.New(size)
	cat.Add("vol", dev)
	srv, err := NewServer(Config{Exports: cat, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	server, kernel := socketPair(t)
	e := &transmissionEnv{srv: srv, dev: dev, cat: cat, kernel: kernel, r: bufio.NewReader(kernel), served: make(chan error, 1)}
	go func() { e.served <- srv.ServeTransmission(server, "vol") }()
	t.Cleanup(func() { _ = srv.Close() })
	return e
}

// kernelRequest is struct nbd_request as the kernel fills it in nbd_send_cmd.
func kernelRequest(cmd, flags uint32, handle string, from uint64, length uint32) []byte {
	h, err := hex.DecodeString(handle)
	if err != nil || len(h) != 8 {
		panic("handle must be 8 bytes in hex")
	}
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint32(b, flags<<16|cmd)
	b = append(b, h...)
	b = binary.BigEndian.AppendUint64(b, from)
	return binary.BigEndian.AppendUint32(b, length)
}

// send writes the request (and payload) as one stream of bytes.
func (e *transmissionEnv) send(t *testing.T, req []byte, payload []byte) {
	t.Helper()
	if _, err := e.kernel.Write(append(append([]byte{}, req...), payload...)); err != nil {
		t.Fatal(err)
	}
}

// expect reads exactly len(want) bytes and compares them.
func (e *transmissionEnv) expect(t *testing.T, what string, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(e.r, got); err != nil {
		t.Fatalf("%s: read %d bytes: %v", what, len(want), err)
	}
	if !bytes.Equal(got, want) {
		if len(want) > 64 {
			t.Fatalf("%s: %d bytes differ from the %d expected", what, len(got), len(want))
		}
		t.Fatalf("%s:\n got  % x\n want % x", what, got, want)
	}
}

// mustHex decodes a hex string with spaces.
func mustHex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

func TestTransmissionWithoutHandshake(t *testing.T) {
	const size = 1 << 20
	e := newTransmissionEnv(t, size)

	// The flags to tell the kernel: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES.
	if f := e.srv.TransmissionFlags(e.dev); f != 0x006d {
		t.Fatalf("transmission flags %#04x, want 0x006d", f)
	}
	if f := e.srv.TransmissionFlags(readOnlyDevice{e.dev}); f != 0x006f {
		t.Fatalf("transmission flags of a read-only device %#04x, want 0x006f (with NBD_FLAG_READ_ONLY)", f)
	}

	// NBD_CMD_WRITE of 512 bytes at 4096: the first bytes the server ever sends are its reply
	// (no greeting, no handshake).
	data := pattern(512, 7)
	e.send(t, kernelRequest(1, 0, "0102030405060708", 4096, 512), data)
	e.expect(t, "write reply", mustHex("67446698 00000000 0102030405060708"))
	if got := e.dev.Contents(4096, 512); !bytes.Equal(got, data) {
		t.Fatal("the write did not reach the device")
	}

	// NBD_CMD_READ: the reply, then the data.
	e.send(t, kernelRequest(0, 0, "a1a2a3a4a5a6a7a8", 4096, 512), nil)
	e.expect(t, "read reply", append(mustHex("67446698 00000000 a1a2a3a4a5a6a7a8"), data...))

	// NBD_CMD_FLUSH (offset and length zero, as the kernel sends it) flushes the device.
	flushes := e.dev.Count(blockdevtest.OpFlush)
	e.send(t, kernelRequest(3, 0, "f100000000000001", 0, 0), nil)
	e.expect(t, "flush reply", mustHex("67446698 00000000 f100000000000001"))
	if e.dev.Count(blockdevtest.OpFlush) != flushes+1 {
		t.Fatal("NBD_CMD_FLUSH did not flush the device")
	}

	// A write with NBD_CMD_FLAG_FUA (bit 16 of the type) is flushed before its reply.
	e.send(t, kernelRequest(1, 1, "f0a0000000000002", 8192, 1024), pattern(1024, 9))
	e.expect(t, "FUA write reply", mustHex("67446698 00000000 f0a0000000000002"))
	if e.dev.Count(blockdevtest.OpFlush) != flushes+2 {
		t.Fatal("a FUA write was not flushed")
	}

	// NBD_CMD_TRIM unmaps its range.
	unmaps := e.dev.Count(blockdevtest.OpUnmap)
	e.send(t, kernelRequest(4, 0, "7700000000000003", 4096, 512), nil)
	e.expect(t, "trim reply", mustHex("67446698 00000000 7700000000000003"))
	if e.dev.Count(blockdevtest.OpUnmap) != unmaps+1 || !bytes.Equal(e.dev.Contents(4096, 512), make([]byte, 512)) {
		t.Fatal("NBD_CMD_TRIM did not unmap its range")
	}

	// NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE (newer kernels send it for REQ_NOUNMAP).
	e.send(t, kernelRequest(6, 2, "2200000000000004", 8192, 512), nil)
	e.expect(t, "write zeroes reply", mustHex("67446698 00000000 2200000000000004"))
	if !bytes.Equal(e.dev.Contents(8192, 512), make([]byte, 512)) {
		t.Fatal("NBD_CMD_WRITE_ZEROES left data")
	}

	// Beyond the end: EINVAL (22) for a read, ENOSPC (28) for a write, no data.
	e.send(t, kernelRequest(0, 0, "ee00000000000005", size, 512), nil)
	e.expect(t, "read beyond the end", mustHex("67446698 00000016 ee00000000000005"))
	e.send(t, kernelRequest(1, 0, "ee00000000000006", size, 512), pattern(512, 1))
	e.expect(t, "write beyond the end", mustHex("67446698 0000001c ee00000000000006"))

	// The device grows (the kernel is told with NBD_CMD_RECONFIGURE): the new range is served at
	// once.
	if err := e.dev.Resize(2 * size); err != nil {
		t.Fatal(err)
	}
	grown := pattern(512, 3)
	e.send(t, kernelRequest(1, 0, "9900000000000007", size+512, 512), grown)
	e.expect(t, "write after growing", mustHex("67446698 00000000 9900000000000007"))
	e.send(t, kernelRequest(0, 0, "9900000000000008", size+512, 512), nil)
	e.expect(t, "read after growing", append(mustHex("67446698 00000000 9900000000000008"), grown...))

	// Pipelined, as the kernel sends them (up to its queue depth) before reading any reply:
	// every request is answered once, with its own handle.
	const n = 32
	var batch []byte
	for i := range n {
		h := binary.BigEndian.AppendUint64(nil, 0xbb00000000000000|uint64(i))
		batch = append(batch, kernelRequest(1, 0, hex.EncodeToString(h), uint64(i)*4096, 4096)...)
		batch = append(batch, pattern(4096, byte(i))...)
	}
	e.send(t, batch, nil)
	seen := map[uint64]bool{}
	for range n {
		var rep [16]byte
		if _, err := io.ReadFull(e.r, rep[:]); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint32(rep[0:]) != 0x67446698 || binary.BigEndian.Uint32(rep[4:]) != 0 {
			t.Fatalf("pipelined write reply % x", rep)
		}
		h := binary.BigEndian.Uint64(rep[8:])
		if h>>56 != 0xbb || h&0xff >= n || seen[h] {
			t.Fatalf("reply with handle %#x", h)
		}
		seen[h] = true
	}
	for i := range n {
		if !bytes.Equal(e.dev.Contents(int64(i)*4096, 4096), pattern(4096, byte(i))) {
			t.Fatalf("pipelined write %d did not land", i)
		}
	}

	// NBD_CMD_DISC ends the connection: ServeTransmission returns nil, the export is closed, the
	// socket closes without another byte.
	e.send(t, kernelRequest(2, 0, "0000000000000000", 0, 0), nil)
	select {
	case err := <-e.served:
		if err != nil {
			t.Fatalf("ServeTransmission after NBD_CMD_DISC: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("ServeTransmission did not return after NBD_CMD_DISC")
	}
	if b, err := e.r.ReadByte(); err == nil {
		t.Fatalf("server sent %#x after NBD_CMD_DISC", b)
	}
	if live := e.cat.Live("vol"); live != 0 {
		t.Fatalf("%d handles of the export still open", live)
	}
}

// The test client of the handshake tests speaks the same transmission phase: it works on a
// connection that never had a handshake, with simple replies.
func TestTransmissionWithTestClient(t *testing.T) {
	e := newTransmissionEnv(t, testSize)
	c := &testClient{t: t, nc: e.kernel, r: e.r, pending: map[uint64]request{}, partial: map[uint64]*reply{}}
	data := pattern(64<<10, 5)
	c.writeAt(0, 128<<10, data)
	if got := c.read(128<<10, 64<<10); !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	if r := c.do(0, cmdBlockStatus, 0, 4096, nil); r.errno != errnoInval {
		t.Fatalf("NBD_CMD_BLOCK_STATUS without negotiation: errno %d, want EINVAL", r.errno)
	}
	if r := c.do(cmdFlagDF, cmdRead, 0, 4096, nil); r.errno != errnoInval {
		t.Fatalf("NBD_CMD_FLAG_DF without structured replies: errno %d, want EINVAL", r.errno)
	}
	if r := c.do(0, cmdRead, 100, 512, nil); r.errno != errnoInval {
		t.Fatalf("unaligned read: errno %d, want EINVAL", r.errno)
	}
	// Counters are updated after each reply is sent.
	soon.True(t, 10*time.Second, "the counters of the requests answered", func() bool {
		st := e.srv.Stats()
		return st.Connections == 1 && st.WritesTotal == 1 && st.ReadsTotal >= 1 && st.InFlight == 0
	})
}

func TestTransmissionEnds(t *testing.T) {
	t.Run("client hangs up", func(t *testing.T) {
		e := newTransmissionEnv(t, testSize)
		e.kernel.Close()
		select {
		case err := <-e.served:
			if err == nil || errors.Is(err, ErrServerClosed) {
				t.Fatalf("ServeTransmission after the client hung up: %v, want why", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("ServeTransmission did not return")
		}
	})
	t.Run("server closes", func(t *testing.T) {
		e := newTransmissionEnv(t, testSize)
		// A request answered first proves the connection is in transmission.
		e.send(t, kernelRequest(3, 0, "0000000000000001", 0, 0), nil)
		e.expect(t, "flush reply", mustHex("67446698 00000000 0000000000000001"))
		if err := e.srv.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-e.served; !errors.Is(err, ErrServerClosed) {
			t.Fatalf("ServeTransmission after Close: %v, want ErrServerClosed", err)
		}
		server, _ := socketPair(t)
		if err := e.srv.ServeTransmission(server, "vol"); !errors.Is(err, ErrServerClosed) {
			t.Fatalf("ServeTransmission on a closed server: %v", err)
		}
	})
	t.Run("unknown export", func(t *testing.T) {
		srv, err := NewServer(Config{Exports: blockdevtest.NewCatalog(), Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		server, kernel := socketPair(t)
		err = srv.ServeTransmission(server, "nope")
		if !errors.Is(err, blockdev.ErrNotFound) {
			t.Fatalf("ServeTransmission of an unknown export: %v", err)
		}
		if _, err := kernel.Read(make([]byte, 1)); err == nil {
			t.Fatal("the socket stayed open")
		}
	})
}

// readOnlyDevice says it refuses writes.
type readOnlyDevice struct{ blockdev.Device }

func (readOnlyDevice) ReadOnly() bool { return true }
