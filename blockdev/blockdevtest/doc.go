// Package blockdevtest provides the test double of the blockdev contract
// that the frontends' tests share: a Device stored in memory or in a real
// file (fsync on Flush, hole punching on UnmapAt), with hooks to hold a call
// inside the device until the test releases it, to fail or corrupt calls,
// and counters of calls, bytes and calls in flight; and a Catalog of such
// devices that counts the handles it opened and has not seen closed.
//
// It is for tests only; nothing in a production path imports it.
package blockdevtest
