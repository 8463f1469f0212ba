package wire

import (
	"crypto/tls"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// HasRoom reports whether a message of about n bytes sent now would be
// written at once: nothing of the client's is being written or waits to be,
// and the connection's socket holds so few unacknowledged bytes that n more
// fit well within its send buffer. A caller that must not wait on a slow or
// stopped peer (one sending from a goroutine with other work) sends only
// then. It reports false when the connection is not a TCP socket (or TLS
// over one), or has ended.
func (c *Client) HasRoom(n int) bool {
	if c.Err() != nil || !c.w.idle() {
		return false
	}
	return socketHasRoom(c.conn, n)
}

// idle reports whether nothing is being written or pending.
func (w *writer) idle() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err == nil && !w.flushing && len(w.pending) == 0
}

// socketHasRoom reports whether the socket under conn has at most a quarter
// of its send buffer in use with n more bytes: a write of n bytes then does
// not wait for the peer (the kernel blocks a writer only at a full buffer,
// counted with overheads that the quarter leaves room for).
func socketHasRoom(conn net.Conn, n int) bool {
	if tc, ok := conn.(*tls.Conn); ok {
		conn = tc.NetConn()
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	room := false
	_ = rc.Control(func(fd uintptr) {
		queued, err := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
		if err != nil {
			return
		}
		buf, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
		if err != nil {
			return
		}
		room = queued+n <= buf/4
	})
	return room
}
