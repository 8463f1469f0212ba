package mds_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"sync"
	"testing"

	"cairn.io/cairn/api/mdspb"
	"cairn.io/cairn/mds"
)

// logRecords collects an MDS's JSON log records.
type logRecords struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logRecords) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// with returns the records whose message is msg.
func (l *logRecords) with(t *testing.T, msg string) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(l.buf.Bytes()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// TestSessionCloseLoggedOnce: closing a session logs one line naming the
// volume (info for a writer, whose open was logged too; debug for a
// reader), and closing it again logs nothing more.
func TestSessionCloseLoggedOnce(t *testing.T) {
	logs := &logRecords{}
	c := newCluster(t, 3, 1, func(cfg *mds.Config) {
		cfg.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	c.createPool(1)
	c.createVolume("vol0", seg)
	vols := c.conn.Volumes()
	for _, writable := range []bool{true, false} {
		o, err := vols.OpenVolume(c.ctx, &mdspb.OpenVolumeRequest{Name: "vol0", Writable: writable, Client: "tester", Features: []string{"clones"}})
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if _, err := vols.CloseVolume(c.ctx, &mdspb.CloseVolumeRequest{Name: "vol0", SessionId: o.Session.SessionId}); err != nil {
				t.Fatal(err)
			}
		}
		var mine []map[string]any
		for _, rec := range logs.with(t, "session closed") {
			if rec["session"] == o.Session.SessionId {
				mine = append(mine, rec)
			}
		}
		if len(mine) != 1 {
			t.Fatalf("writable %v: %d \"session closed\" lines for the session, want 1: %v", writable, len(mine), mine)
		}
		want := "DEBUG"
		if writable {
			want = "INFO"
		}
		if rec := mine[0]; rec["volume"] != "vol0" || rec["client"] != "tester" || rec["writable"] != writable || rec["level"] != want {
			t.Errorf("writable %v: line %v, want volume vol0, client tester, level %s", writable, rec, want)
		}
	}
}
