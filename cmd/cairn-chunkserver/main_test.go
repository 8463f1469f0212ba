package main

import (
	"strings"
	"testing"
)

func TestMissingRequiredFlags(t *testing.T) {
	if err := run([]string{"--zone", "z"}); err == nil || !strings.Contains(err.Error(), "--data-dir") {
		t.Fatalf("missing data dir: %v", err)
	}
	if err := run([]string{"--data-dir", t.TempDir()}); err == nil || !strings.Contains(err.Error(), "--zone") {
		t.Fatalf("missing zone: %v", err)
	}
}
