package nbd

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fileBackend is the test Backend: a real file, fsync on Flush, hole punching on UnmapAt.
type fileBackend struct {
	f    *os.File
	size int64
}

func (b *fileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *fileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *fileBackend) Size() int64                              { return b.size }
func (b *fileBackend) Flush() error                             { return b.f.Sync() }
func (b *fileBackend) Close() error                             { return b.f.Close() }

// UnmapAt punches a hole: the range reads as zeros and gives its blocks back to the filesystem.
func (b *fileBackend) UnmapAt(off, length int64) error {
	err := unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil {
		return fmt.Errorf("punch hole at %d length %d: %w", off, length, err)
	}
	return nil
}

// dirExports serves every regular file of a directory as an export named after the file.
type dirExports struct {
	dir string
	// wrap, if set, wraps each opened export (fault injection, latency, recording).
	wrap func(name string, e Export) Export
}

func (d *dirExports) List(ctx context.Context) ([]string, error) {
	ents, err := os.ReadDir(d.dir)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", d.dir, err)
	}
	var names []string
	for _, e := range ents {
		if e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	return names, nil
}

func (d *dirExports) Open(ctx context.Context, name string) (Export, error) {
	if name == "" || strings.ContainsAny(name, "/\\") || name == "." || name == ".." {
		return nil, fmt.Errorf("export %q: %w", name, ErrUnknownExport)
	}
	f, err := os.OpenFile(filepath.Join(d.dir, name), os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("export %q: %w", name, ErrUnknownExport)
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	var e Export = &fileBackend{f: f, size: st.Size()}
	if d.wrap != nil {
		e = d.wrap(name, e)
	}
	return e, nil
}

// testEnv is a server on an ephemeral loopback port serving the files of a temporary directory.
type testEnv struct {
	t       *testing.T
	dir     string
	exports *dirExports
	srv     *Server
	addr    string
	served  chan error
}

// newTestEnv creates the directory, applies opts to the config and starts serving.
func newTestEnv(t *testing.T, opts ...func(*Config)) *testEnv {
	t.Helper()
	dir := t.TempDir()
	exports := &dirExports{dir: dir}
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
	return path
}

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

// succeedsSoon polls cond until it holds or the deadline passes.
func succeedsSoon(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
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

// memBackend is an in-memory Backend for fuzzing and benchmarks.
type memBackend struct {
	mu   sync.RWMutex
	data []byte
}

func newMemBackend(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off > int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, errors.New("mem: write beyond end")
	}
	return copy(m.data[off:], p), nil
}

func (m *memBackend) UnmapAt(off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+length > int64(len(m.data)) {
		return errors.New("mem: unmap beyond end")
	}
	clear(m.data[off : off+length])
	return nil
}

func (m *memBackend) Flush() error { return nil }
func (m *memBackend) Size() int64  { return int64(len(m.data)) }

// nopCloser turns a shared Backend into an Export whose Close does nothing.
type nopCloser struct{ Backend }

func (nopCloser) Close() error { return nil }

// staticExports serves fixed backends by name.
type staticExports map[string]Backend

func (s staticExports) List(context.Context) ([]string, error) {
	var names []string
	for n := range s {
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}

func (s staticExports) Open(_ context.Context, name string) (Export, error) {
	b, ok := s[name]
	if !ok {
		return nil, fmt.Errorf("export %q: %w", name, ErrUnknownExport)
	}
	return nopCloser{b}, nil
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
