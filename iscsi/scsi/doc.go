// Package scsi is the SCSI block device server of Cairn's iSCSI target: it
// executes SCSI commands (SPC-4 primary commands and the SBC-3 block command
// set) against a Backend (a blockdev.Device), one logical unit per Cairn
// volume. Execute takes the command's context and passes it to every
// backend call.
//
// A LogicalUnit knows nothing of iSCSI. The transport hands it a Command (CDB,
// the data-out buffer the initiator sent, and the I_T nexus the command came
// through) and receives a Response: status, sense data and data-in. Commands
// are executed concurrently; the unit serialises only what SCSI requires to
// be atomic (COMPARE AND WRITE and ORWRITE against other writes to
// overlapping blocks, through a range lock), so a deep queue turns into
// parallel backend calls.
//
// Per-nexus state lives here too: unit attention conditions (power on, reset,
// capacity data has changed), RESERVE(6) reservations and persistent
// reservations (kept in memory; APTPL is not supported).
//
// Sense data is returned in fixed format unless the initiator set D_SENSE in
// the control mode page.
package scsi
