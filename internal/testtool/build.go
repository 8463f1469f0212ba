package testtool

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Builder builds one command once per test binary, for tests that run it
// as a process of its own. Remove, called from TestMain after the tests,
// deletes what it built.
type Builder struct {
	pkg  string
	once sync.Once
	path string
	err  error
}

// NewBuilder returns a Builder for the command package pkg (an import path,
// or "." for the package under test).
func NewBuilder(pkg string) *Builder { return &Builder{pkg: pkg} }

// Path builds the command on first use and returns the binary's path; a
// build failure fails the test with the compiler's output.
func (b *Builder) Path(t testing.TB) string {
	t.Helper()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "cairn-test-bin-")
		if err != nil {
			b.err = err
			return
		}
		name := filepath.Base(b.pkg)
		if b.pkg == "." {
			wd, _ := os.Getwd()
			name = filepath.Base(wd)
		}
		b.path = filepath.Join(dir, name)
		if out, err := exec.Command("go", "build", "-o", b.path, b.pkg).CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v: %s", b.pkg, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// Remove deletes the binary and its directory, if one was built.
func (b *Builder) Remove() {
	if b.path != "" {
		_ = os.RemoveAll(filepath.Dir(b.path))
	}
}
