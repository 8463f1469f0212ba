package nbd

import (
	"crypto/sha256"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"cairn.io/cairn/blockdev/blockdevtest"
)

// fileExports serves the shared test double's file devices: each export is a real file in dir
// (fsync on Flush, hole punching on unmap) opened once as a blockdevtest.Device; every Open hands
// out a handle of it, and the catalog counts the handles not yet closed.
type fileExports struct {
	*blockdevtest.Catalog
	dir string
}

// testEnv is a server on an ephemeral loopback port serving the files of a temporary directory.
type testEnv struct {
	t       *testing.T
	dir     string
	exports *fileExports
	srv     *Server
	addr    string
	served  chan error
}

// newTestEnv creates the directory, applies opts to the config and starts serving.
func newTestEnv(t *testing.T, opts ...func(*Config)) *testEnv {
	t.Helper()
	dir := t.TempDir()
	exports := &fileExports{Catalog: blockdevtest.NewCatalog(), dir: dir}
	cfg := Config{Exports: exports, Logger: testLogger(t)}
	for _, o := range opts {
		o(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	env := &testEnv{t: t, dir: dir, exports: exports, srv: srv, addr: ln.Addr().String(), served: make(chan error, 1)}
	go func() { env.served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-env.served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return env
}

// createExport makes a file export of size bytes filled with content (zeros when nil).
func (e *testEnv) createExport(name string, size int64, content []byte) string {
	e.t.Helper()
	path := filepath.Join(e.dir, name)
	f, err := os.Create(path)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		e.t.Fatal(err)
	}
	if content != nil {
		if _, err := f.WriteAt(content, 0); err != nil {
			e.t.Fatal(err)
		}
	}
	d, err := blockdevtest.NewFile(path)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { d.Close() })
	e.exports.Add(name, d)
	return path
}

// device returns the test device behind an export.
func (e *testEnv) device(name string) *blockdevtest.Device { return e.exports.Device(name) }

func (e *testEnv) uri(name string) string { return "nbd://" + e.addr + "/" + name }

func fileHash(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pattern returns n bytes that differ between blocks and seeds.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i/512) ^ byte(i) ^ seed
	}
	return b
}

// testLogger sends the server's logs to the test log until the test ends.
func testLogger(t *testing.T) *slog.Logger {
	w := &testLogWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// memExports serves in-memory devices of the given sizes.
func memExports(sizes map[string]int64) *blockdevtest.Catalog {
	c := blockdevtest.NewCatalog()
	for n, sz := range sizes {
		c.Add(n, blockdevtest.New(sz))
	}
	return c
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
