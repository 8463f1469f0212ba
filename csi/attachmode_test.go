package csi

import (
	"errors"
	"strings"
	"testing"
)

func TestResolveAttach(t *testing.T) {
	noModule := errors.New("the iscsi_tcp kernel module is not loaded: modprobe iscsi_tcp, or use --attach fuse")
	for _, c := range []struct {
		mode   string
		loaded bool  // the nbd module
		iscsi  error // why the iscsi attach cannot run (nil: it can)
		want   string
		err    string
	}{
		{"", false, nil, AttachFUSE, ""},
		{"fuse", true, nil, AttachFUSE, ""},
		{"nbd", true, nil, AttachNBD, ""},
		{"nbd", false, nil, "", "the nbd kernel module is not loaded: modprobe nbd, or use --attach fuse"},
		{"iscsi", false, nil, AttachISCSI, ""},
		{"iscsi", true, noModule, "", "csi: --attach iscsi: the iscsi_tcp kernel module is not loaded: modprobe iscsi_tcp, or use --attach fuse"},
		{"auto", true, nil, AttachNBD, ""},
		{"auto", false, nil, AttachISCSI, ""},
		{"auto", false, noModule, AttachFUSE, ""},
		{"iscsi-tcp", true, nil, "", `attach mode "iscsi-tcp": want fuse, nbd, iscsi or auto`},
	} {
		asked := false
		missing := func() error { asked = true; return c.iscsi }
		got, err := resolveAttach(c.mode, c.loaded, missing)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("%q (nbd %t, iscsi %v): %q, %v; want an error saying %q", c.mode, c.loaded, c.iscsi, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Fatalf("%q (nbd %t, iscsi %v): %q, %v; want %q", c.mode, c.loaded, c.iscsi, got, err, c.want)
		}
		// The iscsi checks (which dial iscsid) run only where they decide.
		if asked && (c.mode == "fuse" || c.mode == "nbd" || c.mode == "" || (c.mode == "auto" && c.loaded)) {
			t.Fatalf("%q (nbd %t): the iscsi attach was checked for nothing", c.mode, c.loaded)
		}
	}
}
