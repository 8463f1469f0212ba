package chunkserver

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func mustOpenTable(t *testing.T, dir string) *epochTable {
	t.Helper()
	tab, err := openEpochTable(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

// leased gives a table a lease that outlives the test.
func leased(t *testing.T, tab *epochTable) {
	t.Helper()
	if err := tab.sync(false, 0, nil, time.Now(), time.Hour); err != nil {
		t.Fatal(err)
	}
}

func TestRequestWithNewerEpochRaisesTheTable(t *testing.T) {
	dir := t.TempDir()
	tab := mustOpenTable(t, dir)
	leased(t, tab)
	if _, err := tab.raise(7, 2); err != nil {
		t.Fatal(err)
	}
	// A request of a writer that opened after the table was last updated.
	release, err := tab.fence(7, 5)
	if err != nil {
		t.Fatalf("request with a newer epoch: %v", err)
	}
	release()
	// The raise is durable, and the older epoch is refused from then on.
	for _, tb := range []*epochTable{tab, mustOpenTable(t, dir)} {
		leased(t, tb)
		_, err := tb.fence(7, 2)
		var old *epochTooOldError
		if !errors.As(err, &old) || old.current != 5 {
			t.Fatalf("request with epoch 2 after one with 5: %v, want EPOCH_TOO_OLD at 5", err)
		}
		release, err := tb.fence(7, 5)
		if err != nil {
			t.Fatalf("request with the current epoch: %v", err)
		}
		release()
	}
	// Volume 0 names no volume: it is never raised.
	release, err = tab.fence(0, 9)
	if err != nil {
		t.Fatal(err)
	}
	release()
	if tab.epochs[0] != 0 {
		t.Fatalf("volume 0 raised to %d", tab.epochs[0])
	}
}

func TestNoEpochLeaseBeforeTheFirstSync(t *testing.T) {
	tab := mustOpenTable(t, t.TempDir())
	_, err := tab.fence(7, 1)
	if !errors.Is(err, errNoLease) || !strings.Contains(err.Error(), "has not synced") {
		t.Fatalf("request before any sync: %v, want no lease", err)
	}
	// An answer that grants no lease (an older MDS) grants nothing.
	if err := tab.sync(true, 1, map[uint64]uint64{7: 1}, time.Now(), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := tab.fence(7, 1); !errors.Is(err, errNoLease) {
		t.Fatalf("request after a sync without lease: %v, want no lease", err)
	}
}

func TestEpochLeaseCountsFromTheHeartbeatSendTime(t *testing.T) {
	const lease = time.Second
	tab := mustOpenTable(t, t.TempDir())
	// An answer to a heartbeat sent two leases ago arrives now: the lease it
	// grants ran out before it arrived, however long the answer took.
	if err := tab.sync(true, 3, map[uint64]uint64{7: 4}, time.Now().Add(-2*lease), lease); err != nil {
		t.Fatal(err)
	}
	_, err := tab.fence(7, 4)
	if !errors.Is(err, errNoLease) {
		t.Fatalf("request under a lease that ran out before its answer arrived: %v, want no lease", err)
	}
	for _, want := range []string{"holds no epoch lease", "ago", "lease of 1s"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("message %q lacks %q", err, want)
		}
	}
	// The table it carried is taken all the same.
	if tab.epochs[7] != 4 || tab.currentVersion() != 3 {
		t.Fatalf("table after the late answer: epoch %d, version %d", tab.epochs[7], tab.currentVersion())
	}
	// A fresh answer renews it; a late one afterwards does not move it back.
	if err := tab.sync(false, 0, nil, time.Now(), lease); err != nil {
		t.Fatal(err)
	}
	if err := tab.sync(false, 0, nil, time.Now().Add(-2*lease), lease); err != nil {
		t.Fatal(err)
	}
	release, err := tab.fence(7, 4)
	if err != nil {
		t.Fatalf("request under a fresh lease: %v", err)
	}
	release()
	if left := tab.leaseLeft(time.Now()); left <= 0 || left > lease {
		t.Fatalf("lease left %s, want within (0, %s]", left, lease)
	}
}

// TestTryFenceDecidesWithoutWaiting: tryFence admits and refuses as fence
// does, and leaves undecided, holding nothing, a request that would raise
// the table or wait for an update of it in progress.
func TestTryFenceDecidesWithoutWaiting(t *testing.T) {
	tab := mustOpenTable(t, t.TempDir())
	leased(t, tab)
	if _, err := tab.raise(7, 3); err != nil {
		t.Fatal(err)
	}
	release, decided, err := tab.tryFence(7, 3)
	if !decided || err != nil {
		t.Fatalf("current epoch: decided %v, %v", decided, err)
	}
	release()
	var old *epochTooOldError
	if _, decided, err := tab.tryFence(7, 2); !decided || !errors.As(err, &old) {
		t.Fatalf("older epoch: decided %v, %v; want EPOCH_TOO_OLD", decided, err)
	}
	if _, decided, err := tab.tryFence(7, 4); decided || err != nil {
		t.Fatalf("newer epoch: decided %v, %v; want undecided (the table must be raised)", decided, err)
	}
	if tab.epochs[7] != 3 {
		t.Fatalf("tryFence raised the table to %d", tab.epochs[7])
	}
	tab.mu.Lock() // an update in progress
	_, decided, err = tab.tryFence(7, 3)
	tab.mu.Unlock()
	if decided || err != nil {
		t.Fatalf("during an update: decided %v, %v; want undecided", decided, err)
	}
	// Nothing is held: an update goes ahead.
	if _, err := tab.raise(7, 4); err != nil {
		t.Fatal(err)
	}
}
