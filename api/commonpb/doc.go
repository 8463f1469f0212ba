// Package commonpb holds the generated Go code of the types every Cairn service shares
// (api/commonpb/common.proto): copyset references and peers.
//
// Edit the .proto file and run `make proto`; never edit the .pb.go files by hand.
package commonpb
