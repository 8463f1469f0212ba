// Package mdsclient connects to the MDS of a Cairn cluster.
//
// Several MDS processes may run against one etcd; only the elected leader
// serves, the others answer every call with UNAVAILABLE and a mdspb.NotLeader
// detail naming the leader. Conn hides that: it holds connections to every
// known MDS address, sends each call to the one it believes leads, follows
// NotLeader redirects, and retries UNAVAILABLE answers (an MDS down, an
// election in progress) with exponential backoff until the call's deadline or
// the configured retry budget runs out. When all attempts fail the error is
// UNAVAILABLE and names every address that was tried.
//
// Conn implements grpc.ClientConnInterface, so the generated clients work on
// it directly:
//
//	conn, err := mdsclient.Dial([]string{"127.0.0.1:6700", "127.0.0.1:6710"}, mdsclient.Options{})
//	vols := mdspb.NewVolumeServiceClient(conn)
//
// The client library, chunkservers and the ops CLI all reach the MDS this way.
// A call that failed with UNAVAILABLE on the transport may have been carried
// out before the connection broke; retried mutations then answer as their
// idempotency rules say (a repeated create reports ALREADY_EXISTS).
package mdsclient
