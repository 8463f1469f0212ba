package httpdebug

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"cairn.io/cairn/internal/daemon"
)

// Health reports a daemon's health: a one-line status when it serves, an
// error saying why not otherwise.
type Health func(ctx context.Context) (string, error)

// Register adds the /debug/pprof/ handlers to mux.
func Register(mux *http.ServeMux) {
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/debug/loglevel", logLevel)
}

// logLevel shows the process's log level (GET) or sets it (PUT or POST
// with the level as the body: debug, info, warn or error).
func logLevel(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
	case http.MethodPut, http.MethodPost:
		body, err := io.ReadAll(io.LimitReader(r.Body, 64))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var l slog.Level
		if err := l.UnmarshalText(bytes.TrimSpace(body)); err != nil {
			http.Error(w, fmt.Sprintf("log level %q: %v (want debug, info, warn or error)", body, err), http.StatusBadRequest)
			return
		}
		daemon.LogLevel.Set(l)
	default:
		http.Error(w, "GET shows the log level; PUT sets it", http.StatusMethodNotAllowed)
		return
	}
	fmt.Fprintln(w, strings.ToLower(daemon.LogLevel.Level().String()))
}

// Handler serves /metrics from reg, /healthz from health and the profiler.
func Handler(reg prometheus.Gatherer, health Health) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		msg, err := health(ctx)
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, msg)
	})
	Register(mux)
	return mux
}

// Server is a running side listener.
type Server struct {
	lis  net.Listener
	srv  *http.Server
	done chan struct{}
}

// Serve listens on addr and serves h until Close; addr "-" disables the
// listener (Serve returns nil, and a nil Server's methods do nothing).
func Serve(addr string, h http.Handler, log *slog.Logger) (*Server, error) {
	if addr == "-" {
		return nil, nil
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for metrics on %s: %w", addr, err)
	}
	s := &Server{lis: lis, srv: &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}, done: make(chan struct{})}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics listener stopped", "addr", lis.Addr().String(), "err", err)
		}
	}()
	return s, nil
}

// Addr is the bound address, "" for a disabled listener.
func (s *Server) Addr() string {
	if s == nil {
		return ""
	}
	return s.lis.Addr().String()
}

// Close stops the listener, letting requests in progress finish until ctx
// ends.
func (s *Server) Close(ctx context.Context) {
	if s == nil {
		return
	}
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	<-s.done
}
