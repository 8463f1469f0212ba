// Package pdu reads and writes iSCSI protocol data units (RFC 7143 section 11):
// the 48-byte basic header segment, additional header segments, the data
// segment with its padding, and the optional CRC32C header and data digests.
// It also encodes and decodes the key=value text of Login and Text PDUs.
//
// The package knows the wire format only; the meaning of a PDU in a session
// (sequence numbers, negotiation, tasks) belongs to package iscsi, which reads
// every PDU of a connection through Reader and writes responses through Write.
//
// Parsing never trusts a length from the wire: a data segment longer than the
// limit the caller negotiated, or an AHS that runs past the header, is an
// error (ErrDataTooLong, ErrMalformed) and nothing beyond the declared header
// is consumed.
package pdu
