package nbdc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"cairn.io/cairn/blockdev"
	"cairn.io/cairn/nbd"
)

// memExport is an in-memory export; release, when set, holds writes until
// it is closed.
type memExport struct {
	mu      sync.Mutex
	data    []byte
	release chan struct{}
}

func (m *memExport) ReadAt(_ context.Context, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.data[off:]), nil
}

func (m *memExport) WriteAt(_ context.Context, p []byte, off int64) (int, error) {
	if m.release != nil {
		<-m.release
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}
func (m *memExport) UnmapAt(_ context.Context, off, length int64) error { return nil }
func (m *memExport) Flush(context.Context) error                        { return nil }
func (m *memExport) Size() int64                                        { return int64(len(m.data)) }
func (m *memExport) Close() error                                       { return nil }

type exports struct{ e *memExport }

func (x exports) List(context.Context) ([]string, error) { return []string{"vol"}, nil }
func (x exports) Open(_ context.Context, name string) (blockdev.Device, error) {
	if name != "vol" {
		return nil, fmt.Errorf("%w: %s", blockdev.ErrNotFound, name)
	}
	return x.e, nil
}

func serve(t *testing.T, e *memExport) string {
	t.Helper()
	s, err := nbd.NewServer(nbd.Config{Exports: exports{e}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return ln.Addr().String()
}

func TestReadWriteFlushInFlight(t *testing.T) {
	e := &memExport{data: make([]byte, 1<<20)}
	addr := serve(t, e)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, "vol")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	if c.Size() != 1<<20 {
		t.Fatalf("size %d, want %d", c.Size(), 1<<20)
	}
	// Many requests in flight on the one connection, each checked.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			want := bytes.Repeat([]byte{byte(i + 1)}, 4096)
			if err := c.WriteAt(ctx, want, int64(i)*4096); err != nil {
				errs <- err
				return
			}
			got := make([]byte, 4096)
			if err := c.ReadAt(ctx, got, int64(i)*4096); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, want) {
				errs <- fmt.Errorf("block %d read back wrong", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// A misaligned request is answered with an error, not a broken
	// connection.
	var nerr *Error
	if err := c.ReadAt(ctx, make([]byte, 100), 1); !errors.As(err, &nerr) {
		t.Fatalf("misaligned read: %v, want a server error", err)
	}
	if err := c.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatalf("read after an error reply: %v", err)
	}
}

func TestUnknownExportRefused(t *testing.T) {
	addr := serve(t, &memExport{data: make([]byte, 4096)})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := Dial(ctx, addr, "nope"); err == nil {
		t.Fatal("an unknown export was accepted")
	}
}

// A request abandoned by its context breaks the connection and fails
// every request in flight with ErrConnLost.
func TestAbandonedRequestFailsInFlight(t *testing.T) {
	e := &memExport{data: make([]byte, 1<<20), release: make(chan struct{})}
	defer close(e.release)
	addr := serve(t, e)
	c, err := Dial(context.Background(), addr, "vol")
	if err != nil {
		t.Fatal(err)
	}
	other := make(chan error, 1)
	go func() { other <- c.WriteAt(context.Background(), make([]byte, 4096), 0) }()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := c.WriteAt(ctx, make([]byte, 4096), 4096); !errors.Is(err, ErrConnLost) {
		t.Fatalf("abandoned write: %v, want ErrConnLost", err)
	}
	select {
	case err := <-other:
		if !errors.Is(err, ErrConnLost) {
			t.Fatalf("write in flight: %v, want ErrConnLost", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a request in flight was not failed when the connection broke")
	}
	if err := c.ReadAt(context.Background(), make([]byte, 4096), 0); !errors.Is(err, ErrConnLost) {
		t.Fatalf("request after the break: %v, want ErrConnLost", err)
	}
}
