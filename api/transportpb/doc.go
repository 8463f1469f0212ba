// Package transportpb holds the generated Go code of the Raft transport between chunkservers
// (api/transportpb/transport.proto): batched Raft messages, coalesced heartbeats and snapshot streams.
//
// Edit the .proto file and run `make proto`; never edit the .pb.go files by hand.
package transportpb
