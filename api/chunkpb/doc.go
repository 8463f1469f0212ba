// Package chunkpb holds the generated Go code of the chunk service (api/chunkpb/chunk.proto): the
// data path from clients, the MDS and tools to chunkservers, with its Status codes.
//
// Edit the .proto file and run `make proto`; never edit the .pb.go files by hand.
package chunkpb
