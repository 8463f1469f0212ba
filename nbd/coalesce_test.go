package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/blockdev/blockdevtest"
	"cairn.io/cairn/internal/soon"
)

// gatedConn records the size of each write on a connection and holds the
// first until release is closed.
type gatedConn struct {
	net.Conn
	mu      sync.Mutex
	sizes   []int
	entered chan struct{}
	release chan struct{}
}

func (c *gatedConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.sizes = append(c.sizes, len(p))
	first := len(c.sizes) == 1
	c.mu.Unlock()
	if first {
		close(c.entered)
		<-c.release
	}
	return c.Conn.Write(p)
}

// TestRepliesThatCompleteTogetherLeaveInOneWrite: replies that complete
// while another is being written wait for it and leave together, in one
// write, each whole and with its own data.
func TestRepliesThatCompleteTogetherLeaveInOneWrite(t *testing.T) {
	const size, n = 1 << 20, 16
	cat := blockdevtest.NewCatalog()
	dev := blockdevtest.New(size)
	cat.Add("vol", dev)
	for i := range n + 1 {
		if _, err := dev.WriteAt(t.Context(), pattern(4096, byte(i)), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := NewServer(Config{Exports: cat, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	server, kernel := socketPair(t)
	gated := &gatedConn{Conn: server, entered: make(chan struct{}), release: make(chan struct{})}
	var once sync.Once
	releaseWrites := func() { once.Do(func() { close(gated.release) }) }
	t.Cleanup(releaseWrites)
	go func() { _ = srv.ServeTransmission(gated, "vol") }()
	r := bufio.NewReader(kernel)

	// The first read's reply is held in its write.
	if _, err := kernel.Write(kernelRequest(0, 0, "0000000000000000", 0, 4096)); err != nil {
		t.Fatal(err)
	}
	<-gated.entered
	// n more complete meanwhile and wait in the pending buffer.
	var reqs []byte
	for i := 1; i <= n; i++ {
		reqs = append(reqs, kernelRequest(0, 0, fmt.Sprintf("%016x", i), uint64(i)*4096, 4096)...)
	}
	if _, err := kernel.Write(reqs); err != nil {
		t.Fatal(err)
	}
	soon.Succeeds(t, 10*time.Second, func() error {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		for c := range srv.mu.conns {
			if !c.wmu.TryLock() {
				return fmt.Errorf("the reply being written holds the write lock")
			}
			p := len(c.pending)
			c.wmu.Unlock()
			if p < n*(16+4096) {
				return fmt.Errorf("%d bytes pending", p)
			}
		}
		return nil
	})
	releaseWrites()

	seen := map[uint64]bool{}
	for range n + 1 {
		hdr := make([]byte, 16)
		if _, err := io.ReadFull(r, hdr); err != nil {
			t.Fatal(err)
		}
		handle := binary.BigEndian.Uint64(hdr[8:])
		if !bytes.Equal(hdr[:8], mustHex("67446698 00000000")) || handle > n || seen[handle] {
			t.Fatalf("reply header % x", hdr)
		}
		seen[handle] = true
		data := make([]byte, 4096)
		if _, err := io.ReadFull(r, data); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, pattern(4096, byte(handle))) {
			t.Fatalf("reply %d carries another block's data", handle)
		}
	}
	gated.mu.Lock()
	defer gated.mu.Unlock()
	if last := gated.sizes[len(gated.sizes)-1]; last != n*(16+4096) {
		t.Fatalf("writes of %v bytes: the %d replies that completed during the first write did not leave in one", gated.sizes, n)
	}
}

// slowConn makes every write take a little longer, so that replies pile up
// behind the one being written.
type slowConn struct{ net.Conn }

func (c slowConn) Write(p []byte) (int, error) {
	time.Sleep(50 * time.Microsecond)
	return c.Conn.Write(p)
}

// TestRepliesUnderLoadArriveWholeAndOnce: many reads of mixed sizes (some
// copied to the pending buffer, some too large for it, some larger than the
// buffer's bound) at depth, over a connection whose writes are slow: every
// reply arrives once, whole, with its own data.
func TestRepliesUnderLoadArriveWholeAndOnce(t *testing.T) {
	const size, requests, depth = 16 << 20, 400, 48
	sizes := []uint32{4096, 60 << 10, 100 << 10, 1536 << 10}
	cat := blockdevtest.NewCatalog()
	dev := blockdevtest.New(size)
	cat.Add("vol", dev)
	for off := int64(0); off < size; off += 4096 {
		if _, err := dev.WriteAt(t.Context(), pattern(4096, byte(off/4096)), off); err != nil {
			t.Fatal(err)
		}
	}
	srv, err := NewServer(Config{Exports: cat, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	server, kernel := socketPair(t)
	go func() { _ = srv.ServeTransmission(slowConn{server}, "vol") }()

	type want struct {
		off uint64
		n   uint32
	}
	var mu sync.Mutex
	wants := map[uint64]want{}
	slots := make(chan struct{}, depth)
	errs := make(chan error, 1)
	go func() {
		for i := range uint64(requests) {
			slots <- struct{}{}
			n := sizes[i%uint64(len(sizes))]
			off := (i * 7 * 4096) % (size - uint64(n))
			mu.Lock()
			wants[i] = want{off, n}
			mu.Unlock()
			if _, err := kernel.Write(kernelRequest(0, 0, fmt.Sprintf("%016x", i), off, n)); err != nil {
				errs <- err
				return
			}
		}
	}()
	r := bufio.NewReader(kernel)
	seen := map[uint64]bool{}
	for range requests {
		hdr := make([]byte, 16)
		if _, err := io.ReadFull(r, hdr); err != nil {
			t.Fatalf("after %d replies: %v", len(seen), err)
		}
		handle := binary.BigEndian.Uint64(hdr[8:])
		mu.Lock()
		w, ok := wants[handle]
		mu.Unlock()
		if !bytes.Equal(hdr[:8], mustHex("67446698 00000000")) || !ok || seen[handle] {
			t.Fatalf("after %d replies, reply header % x (handle known %v, seen before %v)", len(seen), hdr, ok, seen[handle])
		}
		seen[handle] = true
		data := make([]byte, w.n)
		if _, err := io.ReadFull(r, data); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(data, dev.Contents(int64(w.off), int64(w.n))) {
			t.Fatalf("reply %d (%d bytes at %d) carries other data", handle, w.n, w.off)
		}
		<-slots
	}
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}
