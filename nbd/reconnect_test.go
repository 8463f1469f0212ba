package nbd

import (
	"bytes"
	"net"
	"testing"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
)

// TestUnreadWriteOfADeadConnectionDoesNotOvertakeNewerWrite: a client
// pipelines a write that the server has not read yet (its connection's
// limiter is full: a read is held in the backend), dies and reconnects. The
// new connection attaches while the old one has not noticed the death; its
// write must not be overwritten when the old connection reads the older
// write at last.
func TestUnreadWriteOfADeadConnectionDoesNotOvertakeNewerWrite(t *testing.T) {
	env, dev, hold := exportWithHold(t, blockdevtest.OpRead, func(c *Config) { c.MaxInFlight = 1 })
	a, b := bytes.Repeat([]byte{0xaa}, 4096), bytes.Repeat([]byte{0xbb}, 4096)

	old := connect(t, env.addr, "vol", false)
	old.send(0, cmdRead, 0, 4096, nil)
	<-hold.Entered()
	old.send(0, cmdWrite, 8192, 4096, a) // the client's older write, not read: no room
	old.nc.Close()                       // the client dies

	c := connect(t, env.addr, "vol", false)
	w := c.send(0, cmdWrite, 8192, 4096, b) // newer write, from the client's next connection
	soon.True(t, 10*time.Second, "the old connection counted dead", func() bool { return env.srv.Stats().DeadConnections == 1 })
	soon.True(t, 10*time.Second, "the old connection's read cancelled", hold.Cancelled)
	if n := dev.Count(blockdevtest.OpWrite); n != 0 {
		t.Fatal("the new connection's write ran while the old connection's read was in the backend")
	}
	hold.Release() // the old connection's read returns; its reader gets room
	newerWriteWins(t, env, dev, c, w, b)
}

// TestConnectionsOutsideADrainDoNotEndIt: a connection that ends without
// being dead (NBD_CMD_DISC) while another connection of the export is
// draining does not shorten that drain: a new connection still waits for
// the dead one's write.
func TestConnectionsOutsideADrainDoNotEndIt(t *testing.T) {
	env, dev, hold := exportWithHold(t, blockdevtest.OpWrite)
	other := connect(t, env.addr, "vol", false) // a live connection of the same client
	// A round trip: the server side of other is past its handshake (where a new connection
	// waits for dead ones) before the dead connection dies.
	if r := other.do(0, cmdRead, 8192, 4096, nil); r.errno != 0 {
		t.Fatalf("read: %s", errnoName(r.errno))
	}
	dead := connect(t, env.addr, "vol", false)
	dead.send(0, cmdWrite, 0, 4096, bytes.Repeat([]byte{0xaa}, 4096))
	<-hold.Entered()
	dead.nc.Close()
	soon.True(t, 10*time.Second, "the connection counted dead", func() bool { return env.srv.Stats().DeadConnections == 1 })

	other.send(0, cmdDisc, 0, 0, nil)
	soon.True(t, 10*time.Second, "the disconnected connection ended", func() bool { return env.srv.Stats().Connections == 1 })

	c := connect(t, env.addr, "vol", false)
	w := c.send(0, cmdWrite, 0, 4096, bytes.Repeat([]byte{0xbb}, 4096))
	soon.True(t, 10*time.Second, "the new connection waiting", func() bool { return env.srv.Stats().WaitingConnections == 1 })
	if n := dev.Count(blockdevtest.OpWrite); n != 0 || env.srv.Stats().DeadConnections != 1 {
		t.Fatalf("the dead connection's drain ended early (%d writes ran)", n)
	}
	hold.Release()
	if r, err := c.recv(); err != nil || r.cookie != w || r.errno != 0 {
		t.Fatalf("new write: %v %+v", err, r)
	}
	if got := dev.Contents(0, 4096); got[0] != 0xbb {
		t.Fatalf("block holds %#x..., want the newer write", got[0])
	}
}

// TestDisconnectedConnectionIsNotReaped: a client that sent NBD_CMD_DISC and
// half-closed its socket while a write of its is in the backend is not
// taken for dead when another connection to the export attaches: the write
// completes and is answered, as after any disconnect.
func TestDisconnectedConnectionIsNotReaped(t *testing.T) {
	env, _, hold := exportWithHold(t, blockdevtest.OpWrite)
	old := connect(t, env.addr, "vol", false)
	w := old.send(0, cmdWrite, 0, 4096, pattern(4096, 5))
	<-hold.Entered()
	old.send(0, cmdDisc, 0, 0, nil)
	soon.True(t, 10*time.Second, "the disconnect read", func() bool {
		env.srv.mu.Lock()
		defer env.srv.mu.Unlock()
		for c := range env.srv.mu.conns {
			c.dmu.Lock()
			disc := c.disc
			c.dmu.Unlock()
			if disc {
				return true
			}
		}
		return false
	})
	if err := old.nc.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c := connect(t, env.addr, "vol", false)
	if got := c.read(8192, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("read on the new connection")
	}
	if hold.Cancelled() || env.srv.Stats().DeadConnections != 0 {
		t.Fatal("the new connection took the disconnected one for dead")
	}
	hold.Release()
	if r, err := old.recv(); err != nil || r.cookie != w || r.errno != 0 {
		t.Fatalf("write before the disconnect: %v %+v", err, r)
	}
}

// exportWithHold starts a server with the export "vol" whose first later
// call of op at offset 0 waits in the device until the test releases it.
func exportWithHold(t *testing.T, op blockdevtest.Op, tune ...func(*Config)) (*testEnv, *blockdevtest.Device, *blockdevtest.Hold) {
	t.Helper()
	env := newTestEnv(t, tune...)
	env.createExport("vol", testSize, nil)
	dev := env.device("vol")
	hold := dev.HoldAt(op, 0)
	t.Cleanup(hold.Release)
	return env, dev, hold
}

// newerWriteWins checks the end of a dead connection's drain: the write w (b at 8192) of the
// client's next connection c is answered, the dead connection drains, and the block holds b:
// the dead client's older write, read after its connection was found dead, never ran.
func newerWriteWins(t *testing.T, env *testEnv, dev *blockdevtest.Device, c *testClient, w uint64, b []byte) {
	t.Helper()
	if r, err := c.recv(); err != nil || r.cookie != w || r.errno != 0 {
		t.Fatalf("new write: %v %+v", err, r)
	}
	soon.True(t, 10*time.Second, "the dead connection drained", func() bool {
		st := env.srv.Stats()
		return st.DeadConnections == 0 && st.Connections == 1 && dev.InFlight() == 0
	})
	if got := dev.Contents(8192, 4096); !bytes.Equal(got, b) {
		t.Fatalf("block holds %#x..., want the newer write %#x...", got[0], b[0])
	}
	if n := dev.Count(blockdevtest.OpWrite); n != 1 {
		t.Fatalf("%d writes ran, want only the new connection's", n)
	}
}
