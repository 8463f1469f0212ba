package main

import (
	"strings"
	"testing"
)

func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nbd-listen", "-", "--iscsi-listen", "-"}, "nothing to serve"},
		{[]string{"--mds", " , "}, "no MDS address"},
		{[]string{"--log-level", "loud"}, "--log-level"},
		{[]string{"--poll-interval", "-1s"}, "poll interval"},
		{[]string{"stray"}, "unexpected arguments"},
	} {
		err := run(tc.args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error about %q", tc.args, err, tc.want)
		}
	}
}
