// Package security tests Cairn's transport security over a real cluster
// (MDS, chunkservers, the client library, gRPC and the wire protocol on
// loopback, all with mutual TLS): who may send Raft traffic, what each role
// may call, how handshakes fail, and certificates rotated under IO.
package security
