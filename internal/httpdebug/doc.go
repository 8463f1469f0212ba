// Package httpdebug mounts Go's runtime profiler on a daemon's metrics
// listener, so an operator can take CPU, heap, goroutine and block profiles
// of a running MDS, chunkserver or gateway with `go tool pprof` without a
// restart. The metrics listeners bind to loopback by default.
package httpdebug
