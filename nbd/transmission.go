package nbd

import (
	"errors"
	"net"

	"cairn.io/cairn/blockdev"
)

// Connections without a handshake: the kernel's nbd driver, configured through its generic netlink
// family (NBD_CMD_CONNECT with the socket, the size and the transmission flags, as rbd-nbd and
// curve-nbd do), speaks only the transmission phase on the socket it is given, with simple replies.
// Whoever configures it negotiates on its behalf: it opens the export, tells the kernel the size and
// TransmissionFlags, and hands this server the other end of the socket.

// ServeTransmission serves the export name on nc from the transmission phase on, with no handshake
// (nothing is sent before the first reply): for a client told the export's size and transmission
// flags out of band. The export is opened through Config.Exports like any other and closed when the
// connection ends. Requests get simple replies (no structured replies, no block status). The size
// the client may use can grow while it is attached (the kernel after NBD_CMD_RECONFIGURE with a new
// size): a request beyond the size known so far reads the export's size again.
//
// It blocks until the connection ends and returns nil when the client sent NBD_CMD_DISC,
// ErrServerClosed when Close ended it (or the server was closed before), otherwise why the
// connection ended (the client hung up, the export could not be opened). It closes nc.
func (s *Server) ServeTransmission(nc net.Conn, name string) error {
	c := newServerConn(s, nc)
	if !s.trackConn(c, true) {
		_ = nc.Close()
		return ErrServerClosed
	}
	c.liveSize = true
	err := c.serveWith(func() (*openedExport, error) { return c.openExport(name) })
	switch {
	case errors.Is(err, errClientDisconnected):
		return nil
	case s.isClosed():
		return ErrServerClosed
	}
	return err
}

// TransmissionFlags are the transmission flags ServeTransmission serves dev with (the NBD_FLAG_*
// bits: flush, FUA, trim and write zeroes served, read-only when dev says so): what to tell a
// client that learns them out of band (the kernel's NBD_ATTR_SERVER_FLAGS).
func (s *Server) TransmissionFlags(dev blockdev.Device) uint16 {
	return s.flagsFor(dev, false)
}

// learnSize reads the export's size again, for a client that learns it out of band. The size
// never shrinks under a connection.
func (c *serverConn) learnSize() {
	size := c.export.exp.Size()
	size -= size % MinBlockSize
	if size > 0 && uint64(size) > c.limits.size {
		c.log.Info("nbd: export grew", "size", size, "was", c.limits.size)
		c.limits.size = uint64(size)
	}
}
