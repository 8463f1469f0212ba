// Package iscsi is Cairn's iSCSI target (RFC 7143): it exports Cairn volumes
// to unmodified initiators (open-iscsi, QEMU, libiscsi) as SCSI block
// devices, one target per volume named iqn.2026-11.io.cairn:<volume> with a
// single LUN 0.
//
// The package is meant to be embedded in a gateway process and depends on
// nothing of the cluster, only on package blockdev. A Server takes a
// blockdev.Catalog that lists volumes and opens them as blockdev.Devices
// (ReadAt, WriteAt, UnmapAt and Flush with a context, Size, Close); targets
// appear and disappear as the catalog's volumes do. A volume is opened when
// the first session logs in to its target and closed when the last one
// ends. The backend calls of a command carry the context of its connection,
// which is cancelled when the connection dies.
//
// # Protocol
//
// Login negotiates the operational parameters (digests, data segment and
// burst lengths, ImmediateData, InitialR2T, MaxOutstandingR2T) and
// authenticates with AuthMethod None or CHAP (MD5, per-target secrets,
// optional mutual CHAP). Discovery sessions answer SendTargets. Full-feature
// sessions carry SCSI commands with immediate, unsolicited and solicited
// (R2T) data-out, Data-In with phase-collapsed status, NOP-Out/NOP-In in
// both directions (the target pings idle initiators and drops those that do
// not answer), task management and logout. Error recovery level 0 only: a
// protocol error ends the connection and with it the session.
//
// # Concurrency
//
// Each connection has a reader goroutine that parses PDUs, enforces the
// CmdSN window and moves data-out into task buffers, and a writer goroutine
// that sends responses and stamps the sequence numbers (StatSN, ExpCmdSN,
// MaxCmdSN) at send time. Every SCSI command whose data is complete runs in
// its own goroutine against the logical unit (package scsi), so commands
// complete out of order within the window and a queue depth of N keeps N
// backend calls in flight. The window (MaxCmdSN - ExpCmdSN + 1) shrinks by
// one for each command in flight, which bounds the goroutines a session can
// claim. Its data buffers are bounded in bytes by Config.MaxSessionBuffer:
// half is reserved for the unsolicited data the window lets the initiator
// send, the other half is charged once per command (before its first R2T,
// or before a read runs, until its data is sent); a command that does not
// fit waits without holding up the reader, so back-pressure is the window
// and the R2Ts the target withholds.
//
// A connection that dies (the initiator went away or stopped answering
// pings) has the backend calls of its commands cancelled. Session
// reinstatement (a login with the initiator name and ISID of a live
// session) ends the old session the same way and the new login reaches
// full feature phase only once every command of the old one has returned
// from the backend, without a time cap, so that no old write lands after a
// new one.
//
// The SCSI command set itself lives in package scsi; the wire format of PDUs
// in package pdu.
package iscsi
