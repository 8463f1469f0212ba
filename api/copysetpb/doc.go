// Package copysetpb holds the generated Go code of the copyset admin service
// (api/copysetpb/copyset.proto): creating copysets on chunkservers and reading their Raft status.
//
// Edit the .proto file and run `make proto`; never edit the .pb.go files by hand.
package copysetpb
