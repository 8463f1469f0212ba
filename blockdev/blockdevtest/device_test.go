package blockdevtest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"cairn.io/cairn/blockdev"
)

var bg = context.Background()

func TestMemoryAndFileDevicesStoreAndUnmap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	file, err := NewFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	for name, d := range map[string]*Device{"memory": New(1 << 20), "file": file} {
		data := bytes.Repeat([]byte{7}, 8192)
		if _, err := d.WriteAt(bg, data, 4096); err != nil {
			t.Fatalf("%s: write: %v", name, err)
		}
		if err := d.UnmapAt(bg, 8192, 4096); err != nil {
			t.Fatalf("%s: unmap: %v", name, err)
		}
		got := make([]byte, 8192)
		if _, err := d.ReadAt(bg, got, 4096); err != nil {
			t.Fatalf("%s: read: %v", name, err)
		}
		want := append(bytes.Repeat([]byte{7}, 4096), make([]byte, 4096)...)
		if !bytes.Equal(got, want) || !bytes.Equal(d.Contents(4096, 8192), want) {
			t.Fatalf("%s: read back differs", name)
		}
		if err := d.Flush(bg); err != nil || d.Count(OpFlush) != 1 || d.Bytes(OpWrite) != 8192 {
			t.Fatalf("%s: flush %v, counts %d flushes %d written", name, err, d.Count(OpFlush), d.Bytes(OpWrite))
		}
		if _, err := d.WriteAt(bg, data, 1<<20-4096); !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("%s: write past the end: %v", name, err)
		}
	}
}

func TestHoldKeepsACallInsideUntilReleased(t *testing.T) {
	d := New(1 << 20)
	h := d.HoldAt(OpWrite, 4096)
	ctx, cancel := context.WithCancel(bg)
	done := make(chan error)
	go func() {
		_, err := d.WriteAt(ctx, []byte{1, 2, 3, 4}, 4096)
		done <- err
	}()
	<-h.Entered()
	if d.InFlight() != 1 || h.Cancelled() {
		t.Fatalf("in flight %d, cancelled %v", d.InFlight(), h.Cancelled())
	}
	cancel()
	if !h.Cancelled() {
		t.Fatal("hold does not see its call's context end")
	}
	select {
	case <-h.Returned():
		t.Fatal("held call returned before release")
	default:
	}
	h.Release()
	if err := <-done; err != nil {
		t.Fatalf("released write: %v", err)
	}
	<-h.Returned()
	if !bytes.Equal(d.Contents(4096, 4), []byte{1, 2, 3, 4}) || d.InFlight() != 0 || d.PeakInFlight() != 1 {
		t.Fatal("released write not performed as held")
	}
}

func TestHookFailsPartly(t *testing.T) {
	d := New(1 << 20)
	if _, err := d.WriteAt(bg, bytes.Repeat([]byte{9}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	d.SetHook(func(_ context.Context, c *Call) error {
		if c.Op == OpRead {
			c.Partial = 512
			return boom
		}
		return nil
	})
	p := make([]byte, 4096)
	n, err := d.ReadAt(bg, p, 0)
	if n != 512 || !errors.Is(err, boom) || !bytes.Equal(p[:512], bytes.Repeat([]byte{9}, 512)) || p[512] != 0 {
		t.Fatalf("partial read: %d %v", n, err)
	}
}

func TestCatalogCountsHandles(t *testing.T) {
	c := NewCatalog()
	c.Add("a", New(4096))
	if _, err := c.Open(bg, "b"); !errors.Is(err, blockdev.ErrNotFound) {
		t.Fatalf("open of an unknown device: %v", err)
	}
	h, err := c.Open(bg, "a")
	if err != nil {
		t.Fatal(err)
	}
	if c.Live("a") != 1 || c.Opens("a") != 1 {
		t.Fatalf("live %d opens %d", c.Live("a"), c.Opens("a"))
	}
	h.Close()
	if _, err := h.ReadAt(bg, make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	c.Remove("a")
	if names, _ := c.List(bg); len(names) != 0 || c.Device("a") == nil || c.Live("a") != 0 {
		t.Fatalf("after remove: list %v", names)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("second Close did not panic")
		}
	}()
	h.Close()
}
