// Package httpdebug is every daemon's side listener: the MDS, the
// chunkservers and the gateway each serve /metrics (Prometheus), /healthz
// (200 with a one-line status, 503 with the reason) and Go's runtime
// profiler under /debug/pprof/ on one HTTP address, so an operator can
// scrape, probe and take CPU, heap, goroutine and block profiles of a
// running daemon with `go tool pprof` without a restart. The listeners
// bind to loopback by default.
package httpdebug
