package faultfs

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cairn.io/cairn/internal/soon"
)

// dyingServerEnv makes the test binary run dyingServer instead of the tests.
const dyingServerEnv = "FAULTFS_TEST_DYING_SERVER"

func init() {
	if os.Getenv(dyingServerEnv) != "" {
		// Keep the main goroutine on the main thread (the thread-group
		// leader), so that dyingServer controls which thread gets stuck.
		runtime.LockOSThread()
	}
}

func TestMain(m *testing.M) {
	if v := os.Getenv(dyingServerEnv); v != "" {
		mode, dir, _ := strings.Cut(v, ":")
		if err := dyingServer(dir, mode); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		os.Exit(0) // without unmounting
	}
	os.Exit(m.Run())
}

// dyingServer mounts a faultfs under dir, writes the mount's FUSE
// connection number to dir/conn and returns, so that the process exits
// without unmounting. In the modes "stuck" and "stuck-main" one of its own
// requests is left waiting inside the server first, where no interrupt
// reaches it, from another thread than the main one or from the main
// thread: the process then exits while a thread waits for an answer only it
// could give.
func dyingServer(dir, mode string) error {
	backing, mnt := filepath.Join(dir, "backing"), filepath.Join(dir, "mnt")
	for _, d := range []string{backing, mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	f, err := Mount(backing, mnt, Options{})
	if err != nil {
		return err
	}
	if f.watchdog == nil {
		return fmt.Errorf("no watchdog started")
	}
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		return err
	}
	conn := strconv.FormatUint(uint64(unix.Minor(st.Dev)), 10)
	if err := os.WriteFile(filepath.Join(dir, "conn"), []byte(conn), 0o644); err != nil {
		return err
	}
	if mode == "exit" {
		return nil
	}
	f.gate.Lock() // as a Crash that never ends
	inFlight := func() error {
		for {
			b, err := os.ReadFile(filepath.Join(fusectlDir, conn, "waiting"))
			if err != nil {
				return err
			}
			if n, _ := strconv.Atoi(strings.TrimSpace(string(b))); n > 0 {
				return nil
			}
			time.Sleep(time.Millisecond)
		}
	}
	if mode == "stuck-main" {
		go func() {
			if err := inFlight(); err != nil {
				fmt.Fprintln(os.Stderr, err)
			}
			os.Exit(0)
		}()
		_, err := os.Stat(f.Path("a"))
		return fmt.Errorf("stat came back: %v", err)
	}
	go os.Stat(f.Path("a"))
	return inFlight()
}

// TestWatchdogCleansUpAfterDeadProcess: a process that exits without
// unmounting leaves no mount behind, and one that exits while one of its
// threads waits on its own mount does not stay a zombie for ever.
func TestWatchdogCleansUpAfterDeadProcess(t *testing.T) {
	RequireFUSE(t)
	for _, mode := range []string{"exit", "stuck", "stuck-main"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), dyingServerEnv+"="+mode+":"+dir)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("dying server: %v\n%s", err, out.String())
				}
			case <-time.After(30 * time.Second):
				// Free the process by hand so that the test run goes on.
				conn, _ := os.ReadFile(filepath.Join(dir, "conn"))
				_ = os.WriteFile(filepath.Join(fusectlDir, string(conn), "abort"), []byte("1"), 0)
				_ = unix.Unmount(filepath.Join(dir, "mnt"), unix.MNT_DETACH)
				<-done
				t.Fatal("the process that died on its own mount did not end: the watchdog did not abort the connection")
			}
			// The process has ended (a stuck one only once the watchdog
			// freed it); its mount goes soon after.
			mnt := filepath.Join(dir, "mnt")
			soon.True(t, 20*time.Second, "the dead mount to be detached", func() bool {
				mounts, err := os.ReadFile("/proc/self/mounts")
				return err == nil && !bytes.Contains(mounts, []byte(" "+mnt+" "))
			})
		})
	}
}
