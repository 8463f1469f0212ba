package client

import "testing"

func TestRequestsLowWaterMarkFollowsTheOldestInFlight(t *testing.T) {
	r := newRequests()
	a, b, c := r.begin(), r.begin(), r.begin()
	if a != 1 || b != 2 || c != 3 {
		t.Fatalf("numbers %d %d %d", a, b, c)
	}
	if got := r.attempt(c); got.GetLowSeq() != 1 || got.GetSeq() != 3 || got.GetClientId() == 0 {
		t.Fatalf("attempt %v", got)
	}
	r.end(b) // out of order: 1 still in flight
	if got := r.attempt(c).GetLowSeq(); got != 1 {
		t.Fatalf("low %d while request 1 is in flight", got)
	}
	r.end(a)
	if got := r.attempt(c).GetLowSeq(); got != 3 {
		t.Fatalf("low %d once 1 and 2 returned, want 3", got)
	}
	r.end(c)
	if got := r.attempt(r.begin()).GetLowSeq(); got != 4 || len(r.done) != 0 {
		t.Fatalf("low %d, %d returned numbers kept", got, len(r.done))
	}
}
