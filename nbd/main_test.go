package nbd

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain fails the run when server goroutines outlive the tests: every test closes its server,
// and Close must leave no connection, request or accept goroutine behind.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if leaked := serverGoroutines(); leaked != "" {
			fmt.Fprintf(os.Stderr, "leaked server goroutines:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// serverGoroutines returns the stacks of goroutines running server code, waiting a little for
// goroutines that are finishing.
func serverGoroutines() string {
	deadline := time.Now().Add(10 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "nbd.(*serverConn)") || strings.Contains(g, "nbd.(*Server)") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
