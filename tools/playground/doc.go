// Package playground runs a whole Cairn cluster on one machine, each part in
// its own process, for trying Cairn out, for benchmarks and for end-to-end
// tests: an MDS with its embedded etcd, three chunkservers in three zones
// and a gateway serving the volumes over NBD and iSCSI, all on loopback,
// with every byte of data under one directory.
//
// Start checks that every port is free (naming the process that holds one
// that is not), starts the MDS and waits until it leads, starts the
// chunkservers and waits until the MDS hears their heartbeats, creates the
// logical pool and the volume (vol0, 10 GiB) when they are absent, starts
// the gateway, and returns once the NBD and iSCSI ports accept connections.
// The directory is reused by the next start: the cluster comes back with
// its data.
//
// The playground supervises its children. One that dies unexpectedly after
// the start is restarted (with a log line, and backing off when it keeps
// dying), so a test can kill -9 a chunkserver and watch it come back. A
// child that dies while the playground is still starting fails the start:
// that is a configuration problem. Stop sends SIGTERM to the gateway first
// (it flushes and closes its volumes), then to the chunkservers, then to
// the MDS, and SIGKILL to whichever has not exited after a timeout.
// Children run in their own process groups with a parent-death signal, so
// a Ctrl-C reaches only the playground and a playground that is killed
// leaves nothing running.
//
// Child output goes to <dir>/logs/<name>.log. While it runs, the playground
// keeps <dir>/playground.json up to date (process ids, addresses, data
// directories, restarts; see State and ReadState) and holds a lock on the
// directory so that two playgrounds never share it.
//
// The command is cmd/cairn-playground (make playground).
package playground
