package testtool

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRunReturnsOutputAndErrors(t *testing.T) {
	out := MustRun(t, 10*time.Second, "sh", "-c", "echo hello; echo oops >&2")
	if out != "hello\noops\n" {
		t.Fatalf("output %q", out)
	}
	if _, err := Run(t, 10*time.Second, "sh", "-c", "exit 3"); err == nil {
		t.Fatal("a failing tool returned no error")
	}
	_, err := Run(t, 50*time.Millisecond, "sleep", "10")
	if err == nil || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("a tool past its deadline: %v", err)
	}
}

func TestRandomFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	b := RandomFile(t, p, 4096)
	got, err := os.ReadFile(p)
	if err != nil || string(got) != string(b) || len(b) != 4096 {
		t.Fatalf("file %d bytes, %v", len(got), err)
	}
}

func TestPackageNamesTheMissingTool(t *testing.T) {
	if Package("nbdcopy") != "libnbd-bin" || Package("no-such-tool") != "" {
		t.Fatal("package table")
	}
}
