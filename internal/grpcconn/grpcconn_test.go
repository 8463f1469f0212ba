package grpcconn

import (
	"errors"
	"testing"
)

func TestCacheKeepsOneConnectionPerAddress(t *testing.T) {
	c := NewCache("chunkserver")
	a1, err := c.Get("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := c.Get("127.0.0.1:1")
	b, _ := c.Get("127.0.0.1:2")
	if a1 != a2 || a1 == b {
		t.Fatal("want one connection per address")
	}
	if _, err := c.Get(""); err == nil {
		t.Fatal("an empty address was accepted")
	}
	c.Close()
	if _, err := c.Get("127.0.0.1:1"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Close: %v", err)
	}
}
