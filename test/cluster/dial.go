package cluster

import (
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"cairn.io/cairn/internal/certs"
)

// dial connects to a chunkserver: over TLS as id when id is not nil (a
// TLS cluster), else in plaintext.
func dial(addr string, id *certs.Source) (*grpc.ClientConn, error) {
	creds := grpc.WithTransportCredentials(insecure.NewCredentials())
	if id != nil {
		creds = certs.DialOption(id, certs.RoleChunkServer)
	}
	return grpc.NewClient(addr, creds,
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
}

// DialChunkServer connects to a chunkserver of the cluster as an operator
// would (over TLS in a TLS cluster).
func (c *Cluster) DialChunkServer(addr string) (*grpc.ClientConn, error) {
	return dial(addr, c.Identity(certs.RoleOperator))
}
