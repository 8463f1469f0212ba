// Package testcu reads the output of libiscsi's conformance suite,
// iscsi-test-cu, into an outcome per test (passed, failed or skipped). The
// iSCSI target's conformance test and the end-to-end tests compare these
// outcomes with a recorded list and with Debian's tgt.
package testcu
