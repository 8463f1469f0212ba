package csi

import (
	"strings"
	"testing"
)

func TestResolveAttach(t *testing.T) {
	for _, c := range []struct {
		mode   string
		loaded bool
		want   string
		err    string
	}{
		{"", false, AttachFUSE, ""},
		{"fuse", true, AttachFUSE, ""},
		{"nbd", true, AttachNBD, ""},
		{"nbd", false, "", "the nbd kernel module is not loaded: modprobe nbd, or use --attach fuse"},
		{"auto", true, AttachNBD, ""},
		{"auto", false, AttachFUSE, ""},
		{"iscsi", true, "", `attach mode "iscsi": want fuse, nbd or auto`},
	} {
		got, err := resolveAttach(c.mode, c.loaded)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Fatalf("%q (module loaded %t): %q, %v; want an error saying %q", c.mode, c.loaded, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Fatalf("%q (module loaded %t): %q, %v; want %q", c.mode, c.loaded, got, err, c.want)
		}
	}
}
