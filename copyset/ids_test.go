package copyset

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// TestGroupIDNotation: a copyset id reads POOL:COPYSET in errors and in
// text and JSON logs alike, never as the packed number.
func TestGroupIDNotation(t *testing.T) {
	id := MakeGroupID(1, 44)
	if got := fmt.Sprintf("copyset %s / %v", id, id); got != "copyset 1:44 / 1:44" {
		t.Errorf("formatted: %q", got)
	}
	var text bytes.Buffer
	slog.New(slog.NewTextHandler(&text, nil)).Info("x", "copyset", id)
	if !strings.Contains(text.String(), "copyset=1:44") {
		t.Errorf("text log: %s", text.String())
	}
	var js bytes.Buffer
	slog.New(slog.NewJSONHandler(&js, nil)).With("copyset", id).Info("x")
	var rec map[string]any
	if err := json.Unmarshal(js.Bytes(), &rec); err != nil {
		t.Fatal(err)
	}
	if rec["copyset"] != "1:44" {
		t.Errorf("JSON log: copyset %#v, want \"1:44\" (%s)", rec["copyset"], js.String())
	}
	if back, ok := parseGroupID(id.DirName()); !ok || back != id {
		t.Errorf("directory name %q reads back as %v", id.DirName(), back)
	}
}
