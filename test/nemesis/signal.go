package nemesis

import (
	"context"
	"os/signal"
	"syscall"
)

// signalContext ends on SIGTERM or SIGINT, so that a run stopped from
// outside still stops its daemons and unmounts its filesystems.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
}
