package attach_test

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"cairn.io/cairn/csi/attach"
	"cairn.io/cairn/iscsi"
)

var testNode = attach.ISCSINode{
	Portal: "127.0.0.1:23456", Target: "iqn.2026-11.io.cairn.csi:pvc-1.0123456789ab",
	CHAP:               iscsi.CHAP{User: "cairn-csi", Secret: "initiator-secret", MutualUser: "cairn-csi-target", MutualSecret: "target-secret"},
	ReplacementTimeout: 90500 * time.Millisecond,
}

// A unit test of the iscsiadm command lines the attach builds, written
// from iscsiadm(8) and iscsid.conf's setting names; it runs no iscsiadm.
// TestKernelISCSIAttach and csi's TestNodeKernelISCSI run them against
// open-iscsi (CAIRN_KERNEL_ISCSI=1).
func TestISCSIAdmCommandLines(t *testing.T) {
	node := []string{"-m", "node", "-T", testNode.Target, "-p", testNode.Portal}
	update := func(name, value string) []string {
		return append(append([]string{}, node...), "-o", "update", "-n", name, "-v", value)
	}
	want := [][]string{
		append(append([]string{}, node...), "-o", "new"),
		update("node.startup", "manual"),
		update("node.session.timeo.replacement_timeout", "91"), // whole seconds, rounded up
		update("node.session.auth.authmethod", "CHAP"),
		update("node.session.auth.username", "cairn-csi"),
		update("node.session.auth.password", "initiator-secret"),
		update("node.session.auth.username_in", "cairn-csi-target"),
		update("node.session.auth.password_in", "target-secret"),
		append(append([]string{}, node...), "--login"),
	}
	if got := attach.ISCSILoginCommands(testNode); !reflect.DeepEqual(got, want) {
		t.Errorf("login:\n got %q\nwant %q", got, want)
	}
	wantOut := [][]string{append(append([]string{}, node...), "--logout"), append(append([]string{}, node...), "-o", "delete")}
	if got := attach.ISCSILogoutCommands(testNode); !reflect.DeepEqual(got, wantOut) {
		t.Errorf("logout:\n got %q\nwant %q", got, wantOut)
	}
	// What errors and logs show of a command leaves the secrets out.
	for _, args := range attach.ISCSILoginCommands(testNode) {
		shown := attach.ISCSIRedacted(args)
		if strings.Contains(shown, "secret") && !strings.Contains(shown, "(secret)") {
			t.Errorf("%q shows a secret", shown)
		}
	}
	if got := attach.ISCSIRedacted(want[5]); !strings.HasSuffix(got, "-n node.session.auth.password -v (secret)") {
		t.Errorf("redacted: %q", got)
	}
}

// The disk of a session is found as the kernel lays sysfs out
// (scsi_transport_iscsi: /sys/class/iscsi_session/sessionN links to the
// session under its SCSI host, whose target holds the LUNs H:C:T:L and
// their block devices): a unit test on a tree made here, as no kernel
// session exists on this machine.
func TestISCSIDiskFromSysfs(t *testing.T) {
	root := t.TempDir()
	sys, dev := filepath.Join(root, "sys"), filepath.Join(root, "dev")
	// session adds a session with target whose SCSI host is host, and a
	// LUN lun of it with the disk, when not "".
	session := func(n, host, lun, disk, target string) {
		s := filepath.Join(sys, "devices", "platform", "host"+host, "session"+n)
		lu := filepath.Join(s, "target"+host+":0:0", host+":0:0:"+lun)
		must(t, os.MkdirAll(lu, 0o755))
		if disk != "" {
			must(t, os.MkdirAll(filepath.Join(lu, "block", disk), 0o755))
			must(t, os.MkdirAll(dev, 0o755))
			must(t, os.WriteFile(filepath.Join(dev, disk), nil, 0o644))
		}
		class := filepath.Join(s, "iscsi_session", "session"+n)
		must(t, os.MkdirAll(class, 0o755))
		must(t, os.WriteFile(filepath.Join(class, "targetname"), []byte(target+"\n"), 0o644))
		must(t, os.Symlink(s, filepath.Join(class, "device")))
		must(t, os.MkdirAll(filepath.Join(sys, "class", "iscsi_session"), 0o755))
		must(t, os.Symlink(class, filepath.Join(sys, "class", "iscsi_session", "session"+n)))
	}
	session("1", "3", "0", "sdb", "iqn.2026-11.io.cairn.csi:other.ffffffffffff")
	// The target's session, its LUN 0 scanned but its disk not added yet.
	session("2", "4", "0", "", testNode.Target)
	if d, ok := attach.ISCSIDisk(sys, dev, testNode); ok {
		t.Fatalf("found %s before the disk of the target's LUN 0 was there", d)
	}
	lun1 := filepath.Join(sys, "devices", "platform", "host4", "session2", "target4:0:0", "4:0:0:1", "block", "sdd")
	must(t, os.MkdirAll(lun1, 0o755))
	if d, ok := attach.ISCSIDisk(sys, dev, testNode); ok {
		t.Fatalf("found %s, the disk of LUN 1", d)
	}
	must(t, os.MkdirAll(filepath.Join(sys, "devices", "platform", "host4", "session2", "target4:0:0", "4:0:0:0", "block", "sdc"), 0o755))
	must(t, os.WriteFile(filepath.Join(dev, "sdc"), nil, 0o644))
	if d, ok := attach.ISCSIDisk(sys, dev, testNode); !ok || d != filepath.Join(dev, "sdc") {
		t.Fatalf("disk %q, %t; want %s", d, ok, filepath.Join(dev, "sdc"))
	}
	// Without sysfs, udev's by-path link.
	byPath := filepath.Join(dev, "disk", "by-path")
	must(t, os.MkdirAll(byPath, 0o755))
	must(t, os.Symlink("../../sdc", filepath.Join(byPath, "ip-"+testNode.Portal+"-iscsi-"+testNode.Target+"-lun-0")))
	if d, ok := attach.ISCSIDisk(filepath.Join(root, "nosys"), dev, testNode); !ok || d != filepath.Join(dev, "sdc") {
		t.Fatalf("disk through by-path %q, %t", d, ok)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
