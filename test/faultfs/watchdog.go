package faultfs

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// fusectlDir is where the kernel's fusectl filesystem lists FUSE
// connections.
const fusectlDir = "/sys/fs/fuse/connections"

// watchdogScript runs in a child process for the life of a mount and
// cleans up after the process that serves it, if that process dies without
// unmounting (a panic outside the test goroutine, a test timeout, a kill):
//
//   - The serving process usually uses the mount too (in-process tests, the
//     harness's own checks). If it dies while one of its threads waits for
//     an answer from the mount, which only the dying process could give
//     (a request in flight, or the FLUSH that closing a leaked file sends
//     while the process exits), the thread waits for ever and the process
//     never ends, holding the mount. The script sees that state, a process
//     that has begun to exit (PF_EXITING: a zombie leader, or one closing
//     its files) or a leader in uninterruptible sleep with SIGKILL pending,
//     and aborts the FUSE connection, which frees the thread. Until the
//     process has ended the mount's superblock lives, so the connection
//     number cannot have been reused; aborting the connection of a process
//     that is exiting anyway costs nothing.
//   - Once the process is gone, its mount is dead ("transport endpoint is
//     not connected"); the script detaches it.
//
// The start time guards against a reused pid. Arguments: pid, start time,
// abort file, mount point.
const watchdogScript = `
p=$1 start=$2 abort=$3 mnt=$4
killed() {
	for s in /proc/$p/task/*/status; do
		while read -r k v; do
			case $k in SigPnd:|ShdPnd:)
				d=${v%??}; d=${d#"${d%?}"}
				case $d in [13579bdf]) return 0;; esac;;
			esac
		done < "$s"
	done 2>/dev/null
	return 1
}
while :; do
	l=
	read -r l < /proc/$p/stat 2>/dev/null
	l=${l##*) }
	set -- $l
	if [ "${20}" != "$start" ]; then
		if grep -qsF " $mnt fuse.faultfs " /proc/self/mounts; then
			umount -l "$mnt" 2>/dev/null
		fi
		exit 0
	fi
	# Field 9, the flags: PF_EXITING (4) once the process has begun to exit.
	if [ $(( $7 & 4 )) -ne 0 ] || { [ "$1" = D ] && killed; }; then
		echo 1 > "$abort" 2>/dev/null
	fi
	sleep 1
done
`

// startWatchdog starts the watchdog of the mount at mountpoint, mounting
// fusectl first if needed. It returns nil (and the reason) when it cannot.
func startWatchdog(mountpoint string) (*exec.Cmd, error) {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return nil, fmt.Errorf("stat mount: %w", err)
	}
	if unix.Major(st.Dev) != 0 {
		return nil, fmt.Errorf("mount has device %d:%d, not an anonymous FUSE device", unix.Major(st.Dev), unix.Minor(st.Dev))
	}
	abort := filepath.Join(fusectlDir, strconv.FormatUint(uint64(unix.Minor(st.Dev)), 10), "abort")
	if _, err := os.Stat(abort); errors.Is(err, os.ErrNotExist) {
		// fusectl is not mounted here (systemd usually mounts it).
		if err := unix.Mount("fusectl", fusectlDir, "fusectl", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("mount fusectl: %w", err)
		}
	}
	if _, err := os.Stat(abort); err != nil {
		return nil, fmt.Errorf("fuse connection: %w", err)
	}
	start, err := startTime()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("/bin/sh", "-c", watchdogScript, "faultfs-watchdog", strconv.Itoa(os.Getpid()), start, abort, mountpoint)
	// Its own process group, so that signals to the test's group leave it
	// alive to do its job; no standard streams, so that nothing waits for
	// it to close them.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start watchdog: %w", err)
	}
	return cmd, nil
}

// startTime returns this process's start time (field 22 of /proc/self/stat).
func startTime() (string, error) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return "", err
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 20 {
		return "", fmt.Errorf("short /proc/self/stat")
	}
	return fields[19], nil
}

// stopWatchdog ends the watchdog child.
func stopWatchdog(cmd *exec.Cmd) {
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}
