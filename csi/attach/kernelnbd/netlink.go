package kernelnbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The kernel's interface, from include/uapi/linux/nbd-netlink.h (checked against the copy
// Debian's linux-libc-dev 6.1 installs as /usr/include/linux/nbd-netlink.h) and
// include/uapi/linux/nbd.h; the attribute types are those of nbd_attr_policy and nbd_sock_policy
// in drivers/block/nbd.c.
const (
	familyName    = "nbd" // NBD_GENL_FAMILY_NAME
	familyVersion = 1     // NBD_GENL_VERSION

	// Commands (enum NBD_CMD_*).
	cmdConnect     = 1 // NBD_CMD_CONNECT
	cmdDisconnect  = 2 // NBD_CMD_DISCONNECT
	cmdReconfigure = 3 // NBD_CMD_RECONFIGURE
	cmdLinkDead    = 4 // NBD_CMD_LINK_DEAD: a multicast the kernel sends when a connection dies
	cmdStatus      = 5 // NBD_CMD_STATUS

	// Attributes of the commands (enum NBD_ATTR_*).
	attrIndex             = 1  // NBD_ATTR_INDEX, u32
	attrSizeBytes         = 2  // NBD_ATTR_SIZE_BYTES, u64
	attrBlockSizeBytes    = 3  // NBD_ATTR_BLOCK_SIZE_BYTES, u64
	attrTimeout           = 4  // NBD_ATTR_TIMEOUT, u64 seconds
	attrServerFlags       = 5  // NBD_ATTR_SERVER_FLAGS, u64 (the NBD_FLAG_* transmission flags)
	attrClientFlags       = 6  // NBD_ATTR_CLIENT_FLAGS, u64 (NBD_CFLAG_*)
	attrSockets           = 7  // NBD_ATTR_SOCKETS, nested NBD_SOCK_ITEMs
	attrDeadConnTimeout   = 8  // NBD_ATTR_DEAD_CONN_TIMEOUT, u64 seconds
	attrDeviceList        = 9  // NBD_ATTR_DEVICE_LIST, nested NBD_DEVICE_ITEMs (STATUS replies)
	attrBackendIdentifier = 10 // NBD_ATTR_BACKEND_IDENTIFIER, string (Linux 5.14; older kernels ignore it)

	// NBD_ATTR_SOCKETS holds NBD_SOCK_ITEMs, each holding an NBD_SOCK_FD.
	sockItem = 1 // NBD_SOCK_ITEM
	sockFD   = 1 // NBD_SOCK_FD, u32

	// NBD_ATTR_DEVICE_LIST holds NBD_DEVICE_ITEMs, each an NBD_DEVICE_INDEX and NBD_DEVICE_CONNECTED.
	deviceItem      = 1 // NBD_DEVICE_ITEM
	deviceIndex     = 1 // NBD_DEVICE_INDEX, u32
	deviceConnected = 2 // NBD_DEVICE_CONNECTED, u8
)

// Client flags (NBD_CFLAG_* of include/uapi/linux/nbd.h), for Config.ClientFlags.
const (
	// ClientFlagDestroyOnDisconnect deletes the device when it is disconnected.
	ClientFlagDestroyOnDisconnect = 1 << 0
	// ClientFlagDisconnectOnClose disconnects the device when its last opener closes it.
	ClientFlagDisconnectOnClose = 1 << 1
)

// Netlink framing (include/uapi/linux/netlink.h, genetlink.h): every number in host byte order,
// every header and attribute padded to 4 bytes.
const (
	nlmsgHdrLen = unix.SizeofNlMsghdr // len u32, type u16, flags u16, seq u32, pid u32
	genlHdrLen  = unix.GENL_HDRLEN    // cmd u8, version u8, reserved u16
	nlaHdrLen   = unix.SizeofNlAttr   // len u16, type u16
)

// nlaTypeMask masks the flags off an attribute's type (NLA_TYPE_MASK).
const nlaTypeMask = ^uint16(unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)

func align4(n int) int { return (n + 3) &^ 3 }

// message builds one generic netlink request.
type message struct{ b []byte }

// newMessage starts a request of cmd to the family, asking for an acknowledgement.
func newMessage(family uint16, seq uint32, cmd, version uint8) *message {
	b := make([]byte, nlmsgHdrLen+genlHdrLen, 256)
	ne := binary.NativeEndian
	ne.PutUint16(b[4:], family)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	ne.PutUint32(b[8:], seq)
	// pid 0: the kernel. Then the generic netlink header.
	b[16], b[17] = cmd, version
	return &message{b: b}
}

func (m *message) attr(typ uint16, data []byte) {
	m.b = appendAttr(m.b, typ, data)
}

func (m *message) u32(typ uint16, v uint32) { m.attr(typ, binary.NativeEndian.AppendUint32(nil, v)) }
func (m *message) u64(typ uint16, v uint64) { m.attr(typ, binary.NativeEndian.AppendUint64(nil, v)) }

// str adds a NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING).
func (m *message) str(typ uint16, s string) { m.attr(typ, append([]byte(s), 0)) }

// bytes ends the message: its length goes into the header.
func (m *message) bytes() []byte {
	binary.NativeEndian.PutUint32(m.b[0:], uint32(len(m.b)))
	return m.b
}

// appendAttr appends one attribute: its header (length without padding, type), data, padding.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(nlaHdrLen+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	return append(b, make([]byte, align4(len(data))-len(data))...)
}

// nested is the data of a nested attribute: its attributes one after another. The attribute
// holding them carries NLA_F_NESTED; the kernel takes nested attributes with or without it (it
// masks the flag off: nla_type()).
func nested(attrs ...[]byte) []byte {
	var b []byte
	for _, a := range attrs {
		b = append(b, a...)
	}
	return b
}

// attrs are the attributes of one message or nested attribute, by type (the last one of a type
// wins, as nla_parse does), types without NLA_F_NESTED.
type attrs map[uint16][]byte

// parseAttrs splits b into attributes.
func parseAttrs(b []byte) (attrs, error) {
	out := attrs{}
	for len(b) > 0 {
		if len(b) < nlaHdrLen {
			return nil, fmt.Errorf("attribute header cut short (%d bytes)", len(b))
		}
		n := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
		if n < nlaHdrLen || n > len(b) {
			return nil, fmt.Errorf("attribute %d of length %d in %d bytes", typ, n, len(b))
		}
		out[typ] = b[nlaHdrLen:n]
		b = b[min(align4(n), len(b)):]
	}
	return out, nil
}

// each calls f on every attribute of b in order (for lists of items of one type).
func each(b []byte, f func(typ uint16, data []byte) error) error {
	for len(b) > 0 {
		if len(b) < nlaHdrLen {
			return fmt.Errorf("attribute header cut short (%d bytes)", len(b))
		}
		n := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
		if n < nlaHdrLen || n > len(b) {
			return fmt.Errorf("attribute %d of length %d in %d bytes", typ, n, len(b))
		}
		if err := f(typ, b[nlaHdrLen:n]); err != nil {
			return err
		}
		b = b[min(align4(n), len(b)):]
	}
	return nil
}

func (a attrs) u32(typ uint16) (uint32, bool) {
	d, ok := a[typ]
	if !ok || len(d) < 4 {
		return 0, false
	}
	return binary.NativeEndian.Uint32(d), true
}

func (a attrs) u16(typ uint16) (uint16, bool) {
	d, ok := a[typ]
	if !ok || len(d) < 2 {
		return 0, false
	}
	return binary.NativeEndian.Uint16(d), true
}

// reply is one message the kernel sent back.
type reply struct {
	typ   uint16
	flags uint16
	seq   uint32
	data  []byte // after the netlink header
}

// parseReplies splits what one recv returned into messages.
func parseReplies(b []byte) ([]reply, error) {
	var out []reply
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return nil, fmt.Errorf("netlink header cut short (%d bytes)", len(b))
		}
		n := int(binary.NativeEndian.Uint32(b[0:]))
		if n < nlmsgHdrLen || n > len(b) {
			return nil, fmt.Errorf("netlink message of length %d in %d bytes", n, len(b))
		}
		out = append(out, reply{
			typ:   binary.NativeEndian.Uint16(b[4:]),
			flags: binary.NativeEndian.Uint16(b[6:]),
			seq:   binary.NativeEndian.Uint32(b[8:]),
			data:  b[nlmsgHdrLen:n],
		})
		b = b[min(align4(n), len(b)):]
	}
	return out, nil
}

// ackError decodes an NLMSG_ERROR message: nil for an acknowledgement (error 0), otherwise the
// errno with the kernel's extended message, if it gave one.
func ackError(r reply) error {
	if len(r.data) < 4 {
		return errors.New("NLMSG_ERROR cut short")
	}
	errno := -int32(binary.NativeEndian.Uint32(r.data))
	if errno == 0 {
		return nil
	}
	e := &netlinkError{errno: syscall.Errno(errno)}
	if r.flags&unix.NLM_F_ACK_TLVS == 0 || len(r.data) < 4+nlmsgHdrLen {
		return e
	}
	// The request's header follows the error, with its payload unless the acknowledgement is
	// capped; then the extended acknowledgement's attributes.
	skip := 4 + nlmsgHdrLen
	if r.flags&unix.NLM_F_CAPPED == 0 {
		skip = 4 + align4(int(binary.NativeEndian.Uint32(r.data[4:])))
	}
	if skip <= len(r.data) {
		if tlv, err := parseAttrs(r.data[skip:]); err == nil {
			if m, ok := tlv[unix.NLMSGERR_ATTR_MSG]; ok {
				e.msg = strings.TrimRight(string(m), "\x00")
			}
		}
	}
	return e
}

// netlinkError is an error the kernel answered a request with.
type netlinkError struct {
	errno syscall.Errno
	msg   string // the extended acknowledgement's message, when the kernel gave one
}

func (e *netlinkError) Error() string {
	if e.msg != "" {
		return e.errno.Error() + ": " + e.msg
	}
	return e.errno.Error()
}

func (e *netlinkError) Unwrap() error { return e.errno }
