package nbd

import (
	"bytes"
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
	env := newTestEnv(t, func(c *Config) { c.MaxInFlight = 1 })
	env.createExport("vol", testSize, nil)
	dev := env.device("vol")
	hold := dev.HoldAt(blockdevtest.OpRead, 0)
	t.Cleanup(hold.Release)
	a, b := bytes.Repeat([]byte{0xaa}, 4096), bytes.Repeat([]byte{0xbb}, 4096)

	old := connect(t, env.addr, "vol", false)
	old.send(0, cmdRead, 0, 4096, nil)
	<-hold.Entered()
	old.send(0, cmdWrite, 8192, 4096, a) // the client's older write, not read: no room
	old.nc.Close()                       // the client dies

	c := connect(t, env.addr, "vol", false)
	w := c.send(0, cmdWrite, 8192, 4096, b) // newer write, from the client's next connection
	time.Sleep(50 * time.Millisecond)
	hold.Release() // the old connection's read returns; its reader gets room
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
	// The dead client's write was read after its connection was found dead:
	// it never ran.
	if n := dev.Count(blockdevtest.OpWrite); n != 1 {
		t.Fatalf("%d writes ran, want only the new connection's", n)
	}
}
