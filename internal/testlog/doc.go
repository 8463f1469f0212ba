// Package testlog gives tests a logger for the components they run.
//
// With CAIRN_TEST_LOG unset, components' logs are kept quiet but not lost:
// the last warnings and errors are held in memory and printed when the test
// fails, so a failure seen once in CI still shows what the cluster
// complained about. CAIRN_TEST_LOG=warn prints warnings and errors as they
// happen; any other non-empty value prints everything down to debug.
package testlog
