// Package e2e holds Cairn's end-to-end tests: they build the binaries, start
// a playground (cmd/cairn-playground: an MDS, three chunkservers and the
// gateway, each its own process) in a temporary directory on free ports,
// and drive it with the real Debian clients: nbdcopy, fio's nbd engine,
// qemu-img over nbd:// and iscsi://, and libiscsi's iscsi-* tools. They
// check data byte for byte through a chunkserver killed with SIGKILL in the
// middle of a copy, a restart of the whole playground, and across the two
// frontends.
//
// The tests skip in -short mode and skip a step whose tool is not
// installed, naming the Debian package. They take a few minutes and about
// 1.5 GiB of disk, removed at the end. libiscsi's conformance suite against
// the playground's target runs only with CAIRN_E2E_CONFORMANCE=1. Set
// CAIRN_E2E_KEEP=1 to keep the playground's directory (logs, data) of a
// failed run.
package e2e
