// Package certs is Cairn's transport security: every daemon and tool
// speaks TLS 1.3 with a certificate on both sides (mutual TLS), and a
// server decides what a caller may do from the roles its certificate
// names.
//
// A process's identity is three PEM files (Files: its certificate, its key,
// the authorities it trusts), read by a Source and read again when they
// change, so certificates rotate without restarts. Servers accept through
// NewListener (the handshake done, failures logged with the caller and the
// reason) and check each call against a Policy: gRPC calls by interceptor,
// wire protocol requests and messages by the wire server's Authorize hook.
// Clients dial with DialOption (gRPC) or Dialer (wire), which verify the
// server's certificate against the host dialled.
//
// Roles (RoleMDS, RoleChunkServer, RoleClient, RoleOperator) are the
// organizational units of a certificate's subject. CA and Issue make the
// certificates of the playground and of small clusters.
//
// Without certificates a process runs only with --insecure (Flags), and its
// servers then check nothing.
package certs
