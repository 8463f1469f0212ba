// Package gateway turns the volumes of a Cairn cluster into block devices for
// unmodified initiators: one process serves the NBD export (package nbd) and
// the iSCSI target (package iscsi) for every volume the MDS lists.
//
// # Volumes
//
// Both frontends serve the blockdev contract: the gateway is their
// blockdev.Catalog, and each volume it opens is a client.Volume (a
// blockdev.Device) behind a thin adapter that maps the client's fencing and
// no-space errors to ErrFenced and ENOSPC. Both frontends ask the catalog
// for a volume by name: the NBD server once per connection and once per
// NBD_OPT_INFO probe, the iSCSI server when the first session logs in to a
// target. Opening a Cairn volume
// for writing raises its epoch at the MDS and fences every earlier writer,
// so the gateway must never open a volume per connection: it opens each
// volume once, shares the open volume among every NBD connection, probe and
// iSCSI session that uses it (reference counted), and closes it a short
// linger after the last user left, so that a probe followed by a connection,
// or a reconnecting initiator, does not reopen it. A volume fenced by another
// writer keeps failing writes for the users it has; once they are gone it is
// closed at once and the next user opens it afresh.
//
// The list of exports is the MDS's list of CREATED volumes, restricted by
// Config.Volumes when set, read live for every NBD_OPT_LIST and iSCSI
// SendTargets. A background loop polls the MDS every few seconds: when a
// volume disappears (deleted or renamed) its iSCSI sessions and NBD
// connections are ended (iscsi.Server.DropTarget, nbd.Server.DropExport) and
// no new user joins its open volume; when an open volume's size grows the
// iSCSI target is told (NotifyResize) so that initiators see CAPACITY DATA
// HAS CHANGED and rescan. NBD clients read the size when they connect.
//
// # Life cycle
//
// New checks the Config; Start binds every listener (failing if an address
// is taken), then serves in the background; Stop stops accepting, lets the
// requests in flight finish and answer, flushes and closes every volume and
// returns. The daemon is cmd/cairn-gateway; tests embed a Gateway with
// listeners on 127.0.0.1:0.
//
// # Observability
//
// With Config.MetricsAddr the gateway serves Prometheus metrics on /metrics
// (its own registry: the NBD and iSCSI servers' counters, NBD request
// latency, open volumes, MDS polls) and /healthz, which answers 200 once the
// MDS has been reached and while it stays reachable.
package gateway
