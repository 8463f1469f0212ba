package kernelnbd

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The expected bytes below are written out by hand from the kernel's layout: struct nlmsghdr
// (len u32, type u16, flags u16, seq u32, pid u32), struct genlmsghdr (cmd u8, version u8,
// reserved u16), then attributes (struct nlattr: len u16 without padding, type u16; data padded to
// 4 bytes), numbers in host byte order, here little-endian. Command and attribute numbers are
// those of include/uapi/linux/nbd-netlink.h (CONNECT 1, DISCONNECT 2, RECONFIGURE 3, STATUS 5;
// INDEX 1, SIZE_BYTES 2, BLOCK_SIZE_BYTES 3, SERVER_FLAGS 5, SOCKETS 7 holding SOCK_ITEM 1 holding
// SOCK_FD 1, DEAD_CONN_TIMEOUT 8, BACKEND_IDENTIFIER 10), the attribute types those of the
// kernel's nbd_attr_policy (u32 index and fd, u64 sizes, flags and timeouts, a string backend).

func littleEndian(t *testing.T) {
	t.Helper()
	var probe [2]byte
	binary.NativeEndian.PutUint16(probe[:], 1)
	if probe[0] != 1 {
		t.Skip("the expected bytes are written for a little-endian host")
	}
}

// unhex decodes lines of hex groups separated by single spaces; two spaces or more start a comment.
func unhex(s string) []byte {
	var digits strings.Builder
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if i := strings.Index(line, "  "); i >= 0 {
			line = line[:i]
		}
		digits.WriteString(strings.ReplaceAll(line, " ", ""))
	}
	b, err := hex.DecodeString(digits.String())
	if err != nil {
		panic(err)
	}
	return b
}

func sameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s:\n got  % x\n want % x", what, got, want)
	}
}

const testFamily = 0x1c // a family id as the controller hands them out

func TestConnectMessage(t *testing.T) {
	littleEndian(t)
	cfg := Config{
		Index:           Any,
		Sockets:         []int{5},
		Size:            1 << 30,
		BlockSize:       4096,
		ServerFlags:     0x6d, // HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES
		DeadConnTimeout: 2 * time.Minute,
		BackendID:       "cairn-csi/pvc-1",
	}
	want := unhex(`
		68000000 1c00 0500 07000000 00000000   nlmsghdr: 104 bytes, family 0x1c, REQUEST|ACK, seq 7, to the kernel
		01 01 0000                             genlmsghdr: NBD_CMD_CONNECT, version 1
		0c00 0200 00000040 00000000            NBD_ATTR_SIZE_BYTES u64 1 GiB (no NBD_ATTR_INDEX: the kernel chooses)
		0c00 0300 00100000 00000000            NBD_ATTR_BLOCK_SIZE_BYTES u64 4096
		0c00 0500 6d000000 00000000            NBD_ATTR_SERVER_FLAGS u64 0x6d
		1000 0780                              NBD_ATTR_SOCKETS, nested (NLA_F_NESTED 0x8000), 16 bytes
		  0c00 0180                            NBD_SOCK_ITEM, nested, 12 bytes
		    0800 0100 05000000                 NBD_SOCK_FD u32 5
		0c00 0800 78000000 00000000            NBD_ATTR_DEAD_CONN_TIMEOUT u64 120 seconds
		1400 0a00 6361 6972 6e2d 6373 692f 7076 632d 3100   NBD_ATTR_BACKEND_IDENTIFIER "cairn-csi/pvc-1\0"
	`)
	sameBytes(t, "CONNECT", cfg.encode(testFamily, 7, cmdConnect), want)

	// A chosen device, a timeout, client flags, two sockets.
	cfg = Config{Index: 2, Sockets: []int{5, 6}, Size: 512, ServerFlags: 0x6f, Timeout: 1500 * time.Millisecond,
		ClientFlags: ClientFlagDestroyOnDisconnect}
	want = unhex(`
		68000000 1c00 0500 08000000 00000000
		01 01 0000
		0800 0100 02000000                     NBD_ATTR_INDEX u32 2
		0c00 0200 00020000 00000000            NBD_ATTR_SIZE_BYTES u64 512
		0c00 0400 02000000 00000000            NBD_ATTR_TIMEOUT u64 2 (whole seconds, rounded up)
		0c00 0500 6f000000 00000000            NBD_ATTR_SERVER_FLAGS u64 0x6f (read-only)
		0c00 0600 01000000 00000000            NBD_ATTR_CLIENT_FLAGS u64 NBD_CFLAG_DESTROY_ON_DISCONNECT
		1c00 0780                              NBD_ATTR_SOCKETS, 28 bytes
		  0c00 0180 0800 0100 05000000         NBD_SOCK_ITEM { NBD_SOCK_FD 5 }
		  0c00 0180 0800 0100 06000000         NBD_SOCK_ITEM { NBD_SOCK_FD 6 }
	`)
	sameBytes(t, "CONNECT to nbd2", cfg.encode(testFamily, 8, cmdConnect), want)
}

func TestReconfigureDisconnectStatusMessages(t *testing.T) {
	littleEndian(t)
	// A new attach process takes the device over: its socket, the grown size, the same backend.
	cfg := Config{Index: 3, Sockets: []int{9}, Size: 2 << 30, DeadConnTimeout: 2 * time.Minute, BackendID: "b"}
	want := unhex(`
		4c000000 1c00 0500 09000000 00000000   76 bytes
		03 01 0000                             NBD_CMD_RECONFIGURE, version 1
		0800 0100 03000000                     NBD_ATTR_INDEX u32 3
		0c00 0200 00000080 00000000            NBD_ATTR_SIZE_BYTES u64 2 GiB
		1000 0780 0c00 0180 0800 0100 09000000   NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD 9 } } (no SERVER_FLAGS: CONNECT only)
		0c00 0800 78000000 00000000            NBD_ATTR_DEAD_CONN_TIMEOUT u64 120
		0600 0a00 6200 0000                    NBD_ATTR_BACKEND_IDENTIFIER "b\0", padded
	`)
	sameBytes(t, "RECONFIGURE", cfg.encode(testFamily, 9, cmdReconfigure), want)

	// Growing only.
	want = unhex(`
		28000000 1c00 0500 0a000000 00000000
		03 01 0000
		0800 0100 03000000
		0c00 0200 00000080 00000000
	`)
	sameBytes(t, "RECONFIGURE size", Config{Index: 3, Size: 2 << 30}.encode(testFamily, 10, cmdReconfigure), want)

	want = unhex(`
		1c000000 1c00 0500 0b000000 00000000
		02 01 0000                             NBD_CMD_DISCONNECT
		0800 0100 03000000                     NBD_ATTR_INDEX u32 3
	`)
	sameBytes(t, "DISCONNECT", encodeIndex(testFamily, 11, cmdDisconnect, 3), want)

	want = unhex(`
		14000000 1c00 0500 0c000000 00000000
		05 01 0000                             NBD_CMD_STATUS of every device: no index
	`)
	sameBytes(t, "STATUS", encodeIndex(testFamily, 12, cmdStatus, Any), want)
}

func TestFamilyLookupMessage(t *testing.T) {
	littleEndian(t)
	m := newMessage(unix.GENL_ID_CTRL, 1, unix.CTRL_CMD_GETFAMILY, 1)
	m.str(unix.CTRL_ATTR_FAMILY_NAME, familyName)
	want := unhex(`
		1c000000 1000 0500 01000000 00000000   to GENL_ID_CTRL (0x10)
		03 01 0000                             CTRL_CMD_GETFAMILY
		0800 0200 6e626400                     CTRL_ATTR_FAMILY_NAME "nbd\0"
	`)
	sameBytes(t, "GETFAMILY", m.bytes(), want)
}

// Answers as the kernel builds them: nbd_connect_reply (a message of the family with
// NBD_ATTR_INDEX), then the acknowledgement (NLMSG_ERROR with error 0, capped: only the request's
// header is echoed); an error with an extended acknowledgement message; populate_nbd_status.
func TestParseAnswers(t *testing.T) {
	littleEndian(t)
	connect := unhex(`
		1c000000 1c00 0000 07000000 39300000   the family's message, seq 7, to port 12345
		01 01 0000                             NBD_CMD_CONNECT
		0800 0100 05000000                     NBD_ATTR_INDEX 5
		24000000 0200 0001 07000000 39300000   NLMSG_ERROR, NLM_F_CAPPED, seq 7
		00000000                               error 0: acknowledged
		68000000 1c00 0500 07000000 00000000   the request's header
	`)
	msgs := roundTripOffline(t, connect, 7)
	if idx, err := connectReplyIndex(msgs); err != nil || idx != 5 {
		t.Fatalf("CONNECT answer: index %d, %v", idx, err)
	}

	busy := unhex(`
		34000000 0200 0003 07000000 39300000   NLMSG_ERROR, NLM_F_CAPPED|NLM_F_ACK_TLVS
		f0ffffff                               -16: EBUSY
		68000000 1c00 0500 07000000 00000000
		1000 0100 6e626433 20696e20 75736500   NLMSGERR_ATTR_MSG "nbd3 in use\0"
	`)
	replies, err := parseReplies(busy)
	if err != nil || len(replies) != 1 {
		t.Fatalf("parse %d replies: %v", len(replies), err)
	}
	err = ackError(replies[0])
	if !errors.Is(err, syscall.EBUSY) || !strings.Contains(err.Error(), "nbd3 in use") {
		t.Fatalf("error answer: %v", err)
	}
	// Not capped: the whole request is echoed before the message.
	uncapped := unhex(`
		34000000 0200 0002 07000000 39300000   NLMSG_ERROR, NLM_F_ACK_TLVS, 52 bytes
		eaffffff                               -22: EINVAL
		14000000 1c00 0500 07000000 00000000 05 01 0000   the whole 20-byte request
		0c00 0100 6261642069647800             NLMSGERR_ATTR_MSG "bad idx\0"
	`)
	replies, err = parseReplies(uncapped)
	if err != nil {
		t.Fatal(err)
	}
	if err := ackError(replies[0]); !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "bad idx") {
		t.Fatalf("uncapped error answer: %v", err)
	}

	status := unhex(`
		40000000 1c00 0000 08000000 39300000   64 bytes
		05 01 0000                             NBD_CMD_STATUS
		2c00 0900                              NBD_ATTR_DEVICE_LIST (nla_nest_start_noflag: no NLA_F_NESTED)
		  1400 0100                            NBD_DEVICE_ITEM
		    0800 0100 00000000                 NBD_DEVICE_INDEX 0
		    0500 0200 01 000000                NBD_DEVICE_CONNECTED 1, padded
		  1400 0180                            NBD_DEVICE_ITEM (with NLA_F_NESTED: taken too)
		    0800 0100 07000000                 NBD_DEVICE_INDEX 7
		    0500 0200 00 000000                NBD_DEVICE_CONNECTED 0
		14000000 0200 0001 08000000 39300000 00000000   acknowledged
	`)
	devs, err := parseStatus(roundTripOffline(t, status, 8))
	if err != nil || len(devs) != 2 || devs[0] != (Device{Index: 0, Connected: true}) || devs[1] != (Device{Index: 7}) {
		t.Fatalf("STATUS answer: %+v, %v", devs, err)
	}

	family := unhex(`
		2c000000 1000 0000 01000000 39300000
		01 02 0000                             CTRL_CMD_NEWFAMILY
		0600 0100 1c00 0000                    CTRL_ATTR_FAMILY_ID u16 0x1c, padded
		0800 0200 6e626400                     CTRL_ATTR_FAMILY_NAME "nbd\0"
		0800 0300 01000000                     CTRL_ATTR_VERSION 1
	`)
	replies, err = parseReplies(family)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := familyID([][]byte{replies[0].data}); err != nil || id != 0x1c {
		t.Fatalf("family id %#x, %v", id, err)
	}
}

// roundTripOffline filters answers the way roundTrip does, from bytes instead of the socket.
func roundTripOffline(t *testing.T, b []byte, seq uint32) [][]byte {
	t.Helper()
	replies, err := parseReplies(b)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, r := range replies {
		if r.seq != seq {
			continue
		}
		if r.typ == unix.NLMSG_ERROR {
			if err := ackError(r); err != nil {
				t.Fatal(err)
			}
			return out
		}
		out = append(out, r.data)
	}
	t.Fatal("no acknowledgement")
	return nil
}

// Cut anywhere, answers are refused without a panic.
func TestParseTruncated(t *testing.T) {
	littleEndian(t)
	b := unhex(`
		40000000 1c00 0000 08000000 39300000 05 01 0000
		2c00 0900 1400 0100 0800 0100 00000000 0500 0200 01 000000
		1400 0180 0800 0100 07000000 0500 0200 00 000000
		14000000 0200 0001 08000000 39300000 00000000
	`)
	full, err := parseReplies(b)
	if err != nil || len(full) != 2 {
		t.Fatalf("the whole answer: %d messages, %v", len(full), err)
	}
	if devs, err := parseStatus([][]byte{full[0].data}); err != nil || len(devs) != 2 {
		t.Fatalf("the whole answer: %+v, %v", devs, err)
	}
	// The message cut, and the payload cut inside a message whose header is intact.
	for n := range len(full[0].data) {
		_, _ = parseStatus([][]byte{full[0].data[:n]})
		_, _ = connectReplyIndex([][]byte{full[0].data[:n]})
	}
	for n := range len(b) {
		replies, err := parseReplies(b[:n])
		if err != nil {
			continue
		}
		for _, r := range replies {
			_ = ackError(r)
			_, _ = parseStatus([][]byte{r.data})
			_, _ = connectReplyIndex([][]byte{r.data})
		}
	}
	// An attribute whose length runs past its message.
	if _, err := parseAttrs(unhex("ff00 0100 00000000")); err == nil {
		t.Fatal("an attribute longer than its message was taken")
	}
}

// The generic netlink controller of this machine's kernel answers the family lookup: the path
// every command takes, exercised here whether or not the nbd module is loaded.
func TestFamilyLookupAgainstTheKernel(t *testing.T) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		t.Skipf("no generic netlink socket here: %v", err)
	}
	c := &Conn{fd: fd}
	defer c.Close()
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		t.Fatal(err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	if id, err := c.resolve("nlctrl"); err != nil || id != unix.GENL_ID_CTRL {
		t.Fatalf("the controller's own family: id %#x, %v", id, err)
	}
	if _, err := c.resolve("no-such-family"); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("an unknown family: %v, want ENOENT", err)
	}

	conn, err := Open()
	switch {
	case Loaded() && err != nil:
		t.Fatalf("the nbd module is loaded, and Open: %v", err)
	case Loaded():
		// Listing devices changes nothing.
		devs, err := conn.Status(Any)
		conn.Close()
		if err != nil {
			t.Fatalf("STATUS: %v", err)
		}
		t.Logf("nbd devices: %+v", devs)
	case !errors.Is(err, ErrNotLoaded):
		t.Fatalf("Open without the nbd module: %v, want ErrNotLoaded", err)
	}
}

func TestIndexOf(t *testing.T) {
	for path, want := range map[string]int{"/dev/nbd0": 0, "/dev/nbd15": 15} {
		if got, err := IndexOf(path); err != nil || got != want {
			t.Fatalf("IndexOf(%q) = %d, %v", path, got, err)
		}
	}
	for _, bad := range []string{"/dev/loop0", "/dev/nbd", "/dev/nbd1p1", "/dev/nbd-1", "nbd0"} {
		if _, err := IndexOf(bad); err == nil {
			t.Fatalf("IndexOf(%q) took it", bad)
		}
	}
	if DevicePath(3) != "/dev/nbd3" {
		t.Fatal(DevicePath(3))
	}
}

func TestStateOf(t *testing.T) {
	dir := t.TempDir()
	old := sysBlock
	sysBlock = dir
	defer func() { sysBlock = old }()
	mk := func(name, content string) {
		t.Helper()
		if err := unix.Mkdir(dir+"/nbd4", 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
			t.Fatal(err)
		}
		if err := writeFile(dir+"/nbd4/"+name, content); err != nil {
			t.Fatal(err)
		}
	}
	if st := StateOf(4); st != (State{}) {
		t.Fatalf("state of a missing device %+v", st)
	}
	mk("size", "2097152\n")
	if st := StateOf(4); st.Connected || st.Size != 1<<30 || st.HasBackend {
		t.Fatalf("state of a free device %+v", st)
	}
	mk("pid", "1234\n")
	mk("backend", "cairn-csi/pvc-1/0011\n")
	if st := StateOf(4); !st.Connected || !st.HasBackend || st.Backend != "cairn-csi/pvc-1/0011" {
		t.Fatalf("state of a connected device %+v", st)
	}
}

func writeFile(path, content string) error {
	fd, err := unix.Open(path, unix.O_CREAT|unix.O_WRONLY|unix.O_TRUNC|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Write(fd, []byte(content))
	return err
}
