// Package daemon is what every Cairn command's main shares: how it exits on
// an error, how it reads --log-level and --log-format, which signals stop
// it, and how environment variables give flags their defaults.
package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

// Main runs run with the command-line arguments and exits: 0 on success or
// after -help, 1 with "name: error" on stderr otherwise. --version prints
// the name and Version and exits 0.
func Main(name string, run func(args []string) error) {
	if versionRequested(os.Args[1:]) {
		fmt.Printf("%s %s\n", name, Version())
		return
	}
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
}

// SignalContext is cancelled on SIGTERM or SIGINT, the signals that stop a
// daemon cleanly; stop releases the signal handlers.
func SignalContext() (ctx context.Context, stop context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}

// EnvOr returns the environment variable k, or def when it is unset or empty.
func EnvOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// SplitList splits a comma-separated list, dropping blanks around and
// between the items.
func SplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
