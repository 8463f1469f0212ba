package httpdebug

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"cairn.io/cairn/internal/daemon"
)

func TestRegisterServesProfiles(t *testing.T) {
	mux := http.NewServeMux()
	Register(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	for path, want := range map[string]string{
		"/debug/pprof/":                  "goroutine",
		"/debug/pprof/goroutine?debug=1": "goroutine profile:",
		"/debug/pprof/cmdline":           "httpdebug.test",
	} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %d, body lacks %q", path, resp.StatusCode, want)
		}
	}
}

func TestServeMetricsAndHealth(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "cairn_test_total", Help: "test"})
	reg.MustRegister(c)
	c.Inc()
	var sick atomic.Bool
	s, err := Serve("127.0.0.1:0", Handler(reg, func(context.Context) (string, error) {
		if !sick.Load() {
			return "ok test", nil
		}
		return "", errors.New("stopping")
	}), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + s.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/metrics"); code != 200 || !strings.Contains(body, "cairn_test_total 1") {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	if code, body := get("/healthz"); code != 200 || body != "ok test\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	sick.Store(true)
	if code, body := get("/healthz"); code != 503 || !strings.Contains(body, "stopping") {
		t.Fatalf("/healthz when unhealthy: %d %q", code, body)
	}
	if code, _ := get("/debug/pprof/"); code != 200 {
		t.Fatalf("/debug/pprof/: %d", code)
	}
}

func TestServeDisabled(t *testing.T) {
	s, err := Serve("-", http.NewServeMux(), slog.Default())
	if err != nil || s != nil || s.Addr() != "" {
		t.Fatalf("disabled listener: %v %v", s, err)
	}
	s.Close(context.Background())
}

func TestLogLevelChangesAtRunTime(t *testing.T) {
	mux := http.NewServeMux()
	Register(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	defer daemon.LogLevel.Set(daemon.LogLevel.Level())
	call := func(method, body string) (int, string) {
		req, err := http.NewRequest(method, srv.URL+"/debug/loglevel", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	if code, got := call(http.MethodPut, "debug\n"); code != http.StatusOK || got != "debug" || daemon.LogLevel.Level() != slog.LevelDebug {
		t.Fatalf("PUT debug: %d %q", code, got)
	}
	if code, got := call(http.MethodGet, ""); code != http.StatusOK || got != "debug" {
		t.Fatalf("GET: %d %q", code, got)
	}
	if code, _ := call(http.MethodPut, "loud"); code != http.StatusBadRequest || daemon.LogLevel.Level() != slog.LevelDebug {
		t.Fatalf("PUT loud: %d, level now %v", code, daemon.LogLevel.Level())
	}
	if code, _ := call(http.MethodDelete, ""); code != http.StatusMethodNotAllowed {
		t.Fatalf("DELETE: %d", code)
	}
}
