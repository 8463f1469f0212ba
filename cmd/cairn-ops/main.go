// Command cairn-ops is the operator's command line for a Cairn cluster:
// status, topology, copysets, volumes, leader transfer and consistency
// checks. All of it lives in package tools/ops; see docs/ops.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"cairn.io/cairn/tools/ops"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := ops.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
