package daemon

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version describes the running binary: the commit it was built from (with
// "-dirty" when the tree had changes), the commit's time and the Go
// version, from the build information the go command records.
func Version() string {
	rev, when, dirty := "unknown", "", false
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
				if len(rev) > 12 {
					rev = rev[:12]
				}
			case "vcs.time":
				when = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
	}
	if dirty {
		rev += "-dirty"
	}
	v := "commit " + rev
	if when != "" {
		v += " (" + when + ")"
	}
	return fmt.Sprintf("%s, %s %s/%s", v, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// versionRequested tells whether args ask for the version: --version or
// -version anywhere (no flag of a Cairn command takes such a value).
func versionRequested(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if a == "--version" || a == "-version" {
			return true
		}
	}
	return false
}
