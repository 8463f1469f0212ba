// Package nemesis is Cairn's fault-injection suite over the real
// multi-process cluster, in the manner of Jepsen and etcd's robustness
// tests: an MDS (with its embedded etcd), four chunkservers in three zones
// and the gateway, each its own process built from cmd/, each in its own
// network namespace; clients that write and read 4 KiB registers through
// the client library (in the test process) and through NBD (via the
// gateway); faults injected one at a time; every history checked for
// linearizability with porcupine, and every block's final value checked
// against what was acknowledged.
//
// # The network
//
// TestNemesis builds a private network (package netns): a bridge in a
// namespace of its own and one namespace per process, addresses in
// 10.77.0.0/24, no default route, nothing configured outside the
// namespaces it creates. It then runs itself again inside the clients'
// namespace, so that every connection the client library and the NBD
// client make crosses the private network and can be cut. Partitions are
// nftables rules inside a host's namespace that drop both directions
// between chosen addresses; healing deletes them. The outer test removes
// the namespaces when the run ends, and namespaces left by a killed run
// (named after its pid) at the next start.
//
// # The workload and the checks
//
// Each block is a register: a write stores a value never written before,
// repeated over the block; a read decodes it (a block that is not one value
// repeated is a torn read, which no write explains). Every operation is
// recorded with its call and return times. A write whose outcome is unknown
// (an error, a timeout, a lost connection) is recorded as returning at
// infinity: it may have been applied at any time after its call. A failed
// read is not recorded. Clients of the client library share one writable
// handle of one volume; NBD clients share one connection (many requests in
// flight) to another volume, so that neither fences the other.
//
// Blocks are used in generations: after each cycle (or every few cycles
// in a long run) the workload moves to fresh blocks, the old blocks are
// read once more through a read-only handle, and their history, those
// final reads included, is checked with porcupine (a register per block).
// Unknown writes that no read observed are dropped before checking: such a
// write can always be taken as never applied, and keeping it only makes
// the search exponential. The final values are also checked directly: a
// block whose final value is older than an acknowledged write called after
// that value's write returned is an acknowledged write lost. At the end
// every block checked before is read again and must still hold its final
// value (or the value of one of its unknown writes, which may land late).
//
// # Faults
//
// One fault per cycle, drawn in seeded rounds so that every kind comes
// once per round: kill -9 and restart of a chunkserver, the MDS or the
// gateway; SIGSTOP/SIGCONT of one of them for 1-4 s (longer than a read
// lease and an election timeout); a chunkserver cut from the other
// chunkservers; the clients and the gateway cut from one or two
// chunkservers; a power cut of the chunkserver whose data directory is a
// faultfs mount (test/faultfs: SIGKILL, then every unsynced page dropped);
// failed fsyncs on that chunkserver's chunk files or WAL (a chunkserver
// whose WAL cannot sync exits, and the harness restarts it as a supervisor
// would, as it does for any daemon that exits on its own); and a full disk
// for the chunkserver whose data directory is a small loop-mounted ext4.
// Each cycle logs its phases (set up, injected, in effect, recovered,
// healthy) and bounds each wait; a cluster that does not become healthy
// again (every daemon serving, every chunkserver online, every copyset
// led) within the bound fails the run.
//
// # The report
//
// Every run prints its seed, the operations (acknowledged and unknown), the
// faults per kind with the longest IO stall in their windows (the longest
// time in which a client stream that kept issuing IO completed none), the
// anomalies, the acknowledged writes lost, and the peak RSS (VmHWM) of
// every daemon. On an anomaly the porcupine visualization, the failing
// keys' operations and the daemons' logs are kept in a directory the run
// prints, and the test fails. docs/reliability.md describes how to run it
// and the figures of a long run.
package nemesis
