package netns

import (
	"io"
	"net"
	"os"
	"testing"
	"time"
)

func need(t *testing.T) {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set and network namespaces are unavailable: %v", err)
		}
		t.Skip(err)
	}
}

// dial connects from host a to a listener in host b and reports whether a
// byte came through within timeout.
func reach(t *testing.T, a, b *Host, timeout time.Duration) bool {
	t.Helper()
	var ln net.Listener
	if err := b.Do(func() (err error) { ln, err = net.Listen("tcp", b.Addr+":0"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte{1})
			c.Close()
		}
	}()
	var c net.Conn
	err := a.Do(func() (err error) { c, err = net.DialTimeout("tcp", ln.Addr().String(), timeout); return err })
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(timeout))
	var buf [1]byte
	_, err = io.ReadFull(c, buf[:])
	return err == nil
}

func TestCutAndHeal(t *testing.T) {
	need(t)
	if err := RemoveStale("nettest"); err != nil {
		t.Fatal(err)
	}
	n, err := Create(PIDPrefix("nettest", os.Getpid()), "10.77.9", 2, []string{"a", "b", "c"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Destroy(); err != nil {
			t.Error(err)
		}
	})
	a, b, c := n.Host("a"), n.Host("b"), n.Host("c")
	if !reach(t, a, b, 5*time.Second) || !reach(t, b, a, 5*time.Second) {
		t.Fatal("a and b cannot reach each other before any cut")
	}
	// A host has no route outside the bridge.
	if err := a.Do(func() error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:1", time.Second)
		if err == nil {
			c.Close()
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := n.Cut("a", "b"); err != nil {
		t.Fatal(err)
	}
	if reach(t, a, b, 500*time.Millisecond) || reach(t, b, a, 500*time.Millisecond) {
		t.Fatal("a and b reach each other across a cut")
	}
	if !reach(t, a, c, 5*time.Second) || !reach(t, c, b, 5*time.Second) {
		t.Fatal("a cut between a and b separated others")
	}
	if got := n.Cuts(); len(got) != 1 || got[0] != "a|b" {
		t.Fatalf("cuts %v, want [a|b]", got)
	}
	if err := n.HealAll(); err != nil {
		t.Fatal(err)
	}
	if !reach(t, a, b, 5*time.Second) || !reach(t, b, a, 5*time.Second) {
		t.Fatal("a and b cannot reach each other after healing")
	}
}

func TestRemoveStale(t *testing.T) {
	need(t)
	// A pid that cannot run: above the kernel's limit.
	n, err := Create(PIDPrefix("nettest", 1<<30), "10.77.9", 2, []string{"x"})
	if err != nil {
		t.Fatal(err)
	}
	path := n.Host("x").Path()
	if err := RemoveStale("nettest"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		n.Destroy()
		t.Fatalf("stale namespace %s survived RemoveStale (%v)", path, err)
	}
	// The bridge namespace of a stale network goes too.
	if _, err := os.Stat("/run/netns/" + n.bridge); !os.IsNotExist(err) {
		n.Destroy()
		t.Fatalf("stale bridge namespace survived RemoveStale (%v)", err)
	}
}
