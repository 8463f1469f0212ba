//go:build !linux

package nbd

import "net"

// peerHungUp tells whether the other end of nc closed or reset the connection; only Linux can
// tell (POLLRDHUP) with bytes it sent still unread.
func peerHungUp(net.Conn) bool { return false }
